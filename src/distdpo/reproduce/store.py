"""The run store: every finished run kept as DIR/runs/NNNN.json, so that an interrupted call can be resumed."""

from __future__ import annotations

import json
from pathlib import Path

from distdpo import rundir
from distdpo.config import ConfigError, from_dict
from distdpo.experiment import Cache
from distdpo.fingerprint import mismatch
from distdpo.io import write_text_atomic
from distdpo.reproduce.runs import Run

RUN_RECORD_KEYS = {"label", "table", "rows", "summary", "seconds"}


def canonical(table: dict) -> str:
    return json.dumps(table, sort_keys=True)


def finished_runs(out: Path, resume: bool) -> dict[str, dict]:
    """The run records an earlier call left in out/runs/, by label; a directory with results needs ``resume``."""
    rundir.claim(out, "reproduce")  # refuses anyone else's files and a second writer
    files = sorted((out / "runs").glob("*.json"))
    if (files or (out / "summary.json").exists()) and not resume:
        raise ConfigError(f"{out} already holds results; pass --resume to continue it or choose another --out")
    done = {}
    for path in files:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as e:  # writes are atomic, so this is a foreign or edited file
            raise ConfigError(f"cannot resume {out}: {path.name} is not JSON ({e})") from None
        if not isinstance(record, dict) or not RUN_RECORD_KEYS <= record.keys():
            needs = ", ".join(sorted(RUN_RECORD_KEYS))
            raise ConfigError(f"cannot resume {out}: {path.name} is not a run record (needs {needs})")
        done[record["label"]] = record
    return done


def restore(run: Run, done: dict[str, dict], cache: Cache) -> bool:
    """Fill ``run`` from the record of the same label and config in ``done``; False when there is none.

    A record whose data or model fingerprint differs from today's is refused.
    """
    record = done.get(run.label)
    if record is None or canonical(record["table"]) != canonical(run.table):
        return False
    stored = record["summary"].get("fingerprint")
    changed = mismatch(stored, cache.fingerprint(from_dict(run.table)), f"the run record of {run.label!r}")
    if changed:
        raise ConfigError(f"cannot resume: {changed}; rerun into a new --out")
    run.rows, run.summary, run.seconds, run.reused = record["rows"], record["summary"], record["seconds"], True
    return True


def save(out: Path, index: int, run: Run) -> None:
    """Keep a finished run as out/runs/NNNN.json (Python's JSON keeps NaN; only this package reads them back)."""
    record = {"label": run.label, "table": run.table, "rows": run.rows, "summary": run.summary, "seconds": run.seconds}
    write_text_atomic(out / "runs" / f"{index:04d}.json", json.dumps(record))
