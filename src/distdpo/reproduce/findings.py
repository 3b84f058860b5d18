"""What an analysis hands back: claims held against the data, the fits behind them, and report sections."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from distdpo.report import Figure, Section, Table
from distdpo.reproduce.stats import Verdict, fit_text, verdict


@dataclass
class Claim:
    experiment: str
    claim: str
    predicted: str
    measured: str
    verdict: Verdict
    regime: str
    exact: bool = False  # tests a zero floor, which only exact (full-batch) gradients can show

    def row(self) -> list[str]:
        return [self.experiment, self.claim, self.predicted, self.measured, str(self.verdict), self.regime]

    def as_dict(self) -> dict[str, Any]:
        return {
            "experiment": self.experiment,
            "claim": self.claim,
            "predicted": self.predicted,
            "measured": self.measured,
            "verdict": str(self.verdict),
            "regime": self.regime,
            "exact": self.exact,
        }


@dataclass
class Findings:
    """One experiment's claims, fits (by name, as summary.json keeps them), sections and notes."""

    experiment: str
    claims: list[Claim] = field(default_factory=list)
    fits: dict[str, dict] = field(default_factory=dict)
    sections: list[Section] = field(default_factory=list)
    claims_note: str = ""  # appended to the paragraph above the claim table
    theory: dict[str, Any] = field(default_factory=dict)

    def fitted(self, name: str, claim: str, predicted: str, fit: dict, regime: str) -> None:
        """A claim about an exponent: the fit is kept under ``name`` and its verdict read from its CI."""
        self.fits[name] = fit
        self.claims.append(Claim(self.experiment, claim, predicted, f"slope {fit_text(fit)}", verdict(fit), regime))

    def claimed(
        self, claim: str, predicted: str, measured: str, outcome: Verdict | bool, regime: str, *, exact: bool = False
    ) -> None:
        """A claim decided by a comparison (``True`` = holds) or with a verdict of its own."""
        result = outcome if isinstance(outcome, Verdict) else Verdict.of(bool(outcome))
        self.claims.append(Claim(self.experiment, claim, predicted, measured, result, regime, exact))

    def section(self, title: str, about: str, figures: list[Figure], tables: list[Table] = ()) -> None:
        """A report section: one paragraph, its tables, its figures."""
        self.sections.append(Section(title, [about], list(tables), list(figures)))
