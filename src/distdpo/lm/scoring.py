"""``distdpo eval``: a model's log-probabilities of preference pairs, and the preference accuracy they imply.

Pairs are loaded, tokenized and truncated exactly as training does (:func:`distdpo.data.text.load_preferences`,
:func:`distdpo.lm.logprobs.tokenize_pairs`: EOS appended, the end of the prompt kept) and scored with
:func:`distdpo.lm.logprobs.pair_logps`. With an adapter the reference is the base model (the adapter disabled)
and a pair is ranked right when its chosen response has the larger implicit reward β·log π/π_ref; without one,
when log π(chosen) > log π(rejected).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distdpo import __version__
from distdpo.config import ConfigError, default
from distdpo.data.text import DataFormatError, load_preferences
from distdpo.io import write_json_atomic, write_text_atomic
from distdpo.lm.logprobs import pack, pair_logps, tokenize_pairs
from distdpo.lm.pretrained import export_info, load_model

WRITER = f"distdpo eval {__version__}"
DROPPED = ("dropped_empty", "dropped_identical", "dropped_non_string", "dropped_ties", "skipped_malformed")


@torch.no_grad()
def score_pairs(model, pairs, pad_id: int, *, reference: bool, batch_size: int = 16) -> dict[str, torch.Tensor]:
    """Summed completion log-probs of every pair (float64, CPU): ``chosen_logps``, ``rejected_logps`` and, with
    ``reference``, the same with the model's adapter disabled (``ref_chosen_logps``, ``ref_rejected_logps``)."""
    device = next(model.parameters()).device
    names = ["chosen_logps", "rejected_logps"] + (["ref_chosen_logps", "ref_rejected_logps"] if reference else [])
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(pairs), batch_size):
        batch = pack(pairs, list(range(start, min(start + batch_size, len(pairs)))), pad_id).to(device)
        values = list(pair_logps(model, batch))
        if reference:
            with model.disable_adapter():
                values += pair_logps(model, batch)
        for name, value in zip(names, values):
            parts[name].append(value.double().cpu())
    empty = torch.zeros(0, dtype=torch.float64)
    return {name: torch.cat(chunks) if chunks else empty for name, chunks in parts.items()}


def margins(scores: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)], or log π(chosen) − log π(rejected)."""
    if "ref_chosen_logps" not in scores:
        return scores["chosen_logps"] - scores["rejected_logps"]
    chosen = scores["chosen_logps"] - scores["ref_chosen_logps"]
    return beta * (chosen - (scores["rejected_logps"] - scores["ref_rejected_logps"]))


def _trained_with(model: str, adapter: str | None) -> dict:
    """The policy settings of the run that exported ``adapter`` or ``model`` ({} for a model from elsewhere)."""
    for folder in (adapter, model):
        if folder and Path(folder).expanduser().is_dir():
            policy = export_info(folder).get("config", {}).get("policy")
            if isinstance(policy, dict):
                return policy
    return {}


def evaluate(
    model: str,
    data: str,
    *,
    adapter: str | None = None,
    format: str = "auto",
    max_length: int | None = None,
    beta: float | None = None,
    batch_size: int = 16,
    device: str = "cpu",
) -> tuple[list[dict], dict]:
    """Score the pairs of ``data`` with ``model`` (and ``adapter``); returns one record per pair and a summary.

    ``max_length`` and ``beta`` default to those the model was trained with (a distdpo export), else to the config
    defaults.
    """
    trained = _trained_with(model, adapter)
    if trained.get("reference_model"):  # its implicit reward is against that model, not the adapter switched off
        raise ConfigError(
            f"this export was trained against policy.reference_model = {trained['reference_model']!r}; distdpo eval "
            "scores against the model with its adapter off, which would give another implicit reward"
        )
    max_length = max_length or trained.get("max_length") or default("policy.max_length")
    beta = beta or trained.get("beta") or default("policy.beta")
    if max_length < 8:
        raise ConfigError(f"--max-length = {max_length} cannot hold a prompt token and a completion: use at least 8")
    try:
        pairs_text = load_preferences(data, format)
    except (DataFormatError, FileNotFoundError) as e:
        raise ConfigError(f"--data: {e}") from None
    lm, tokenizer, adapted = load_model(model, "--model", adapter=adapter)
    if tokenizer.eos_token_id is None:
        raise ConfigError(f"--model = {model!r}: its tokenizer has no EOS token, which every completion ends with")
    lm.to(device).eval()
    pairs = tokenize_pairs(tokenizer, pairs_text.prompt, pairs_text.chosen, pairs_text.rejected, max_length)
    scores = score_pairs(lm, pairs, tokenizer.pad_token_id, reference=adapted, batch_size=batch_size)
    margin = margins(scores, beta)
    sources = pairs_text.columns.get("source_index", [None] * len(pairs))
    records = [
        {"index": i, "source_index": sources[i], **{k: float(v[i]) for k, v in scores.items()}, "margin": float(m)}
        for i, m in enumerate(margin)
    ]
    dropped = {k: pairs_text.stats.get(k, 0) for k in DROPPED}
    summary = {
        "written_by": WRITER,
        "model": model,
        "adapter": adapter,
        "data": str(data),
        "score": "implicit_reward" if adapted else "log_likelihood_ratio",
        "beta": beta if adapted else None,
        "max_length": max_length,
        "pairs": len(pairs),
        "accuracy": float((margin > 0).double().mean()) if len(pairs) else float("nan"),
        "mean_margin": float(margin.mean()) if len(pairs) else float("nan"),
        "truncated_prompts": pairs.stats["truncated_prompts"],
        "truncated_completions": pairs.stats["truncated_completions"],
        "dropped_pairs": sum(dropped.values()),
        "dropped": dropped,
    }
    return records, summary


def summary_path(out: str | Path) -> Path:
    """``scores.jsonl`` → ``scores.summary.json``."""
    out = Path(out)
    return out.with_name(out.name.removesuffix(".jsonl") + ".summary.json")


def check_out(out: str | Path) -> None:
    """Refuse an ``--out`` that is a directory or a file an earlier ``distdpo eval`` did not write (before scoring)."""
    out, beside = Path(out), summary_path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory; give a file name (e.g. scores.jsonl)")
    if out.exists() or beside.exists():
        try:
            ours = str(json.loads(beside.read_text()).get("written_by", "")).startswith("distdpo eval")
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise ConfigError(f"--out {out} exists and was not written by distdpo eval; choose another file")


def write_scores(out: str | Path, records: list[dict], summary: dict) -> Path:
    """Write the records (JSON lines) to ``out`` and the summary beside it (after :func:`check_out`)."""
    check_out(out)
    out, beside = Path(out), summary_path(out)
    write_text_atomic(out, "".join(json.dumps(r) + "\n" for r in records))
    write_json_atomic(beside, {**summary, "scores": out.name})
    return beside


def format_summary(summary: dict) -> str:
    what = (
        f"implicit reward β·log π/π_ref (β = {summary['beta']:g}) of chosen > rejected"
        if summary["score"] == "implicit_reward"
        else "log π(chosen) > log π(rejected)"
    )
    return "\n".join(
        [
            f"pairs            {summary['pairs']}  (dropped {summary['dropped_pairs']}; truncated: "
            f"{summary['truncated_prompts']} prompts, {summary['truncated_completions']} completions)",
            f"accuracy         {summary['accuracy']:.4f}  ({what})",
            f"mean margin      {summary['mean_margin']:.4g}",
        ]
    )


__all__ = ["evaluate", "format_summary", "margins", "score_pairs", "summary_path", "write_scores"]
