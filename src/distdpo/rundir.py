"""Output directories that distdpo owns: a marker says so, a lock keeps a second writer out.

distdpo writes into a directory only if it is new, empty, or marked as written by
distdpo (``.distdpo-run.json``, or a ``summary.json`` of an older run directory);
a directory holding anyone else's files is refused, so a user's files are never
overwritten. While a process writes, it holds an OS lock on ``.distdpo.lock`` in
the directory; the lock disappears with the process, so a crash never leaves a
stale lock, and a second process is refused while the first is alive.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from distdpo import __version__
from distdpo.config import ConfigError
from distdpo.io import write_json_atomic

MARKER = ".distdpo-run.json"
LOCK = ".distdpo.lock"

_held: dict[Path, int] = {}  # directory -> open lock file descriptor (kept for the life of the process)


def _is_ours(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    try:  # run directories written before the marker existed
        return "runs" in json.loads((path / "summary.json").read_text())
    except (OSError, ValueError, TypeError):
        return False


def claim(path: str | Path, kind: str) -> Path:
    """Make ``path`` a distdpo ``kind`` directory ("run", "reproduce") and lock it; refuses anyone else's files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file, not a directory; give a directory path")
    if path.is_dir() and any(p.name not in (MARKER, LOCK) for p in path.iterdir()) and not _is_ours(path):
        names = sorted(p.name for p in path.iterdir())[:5]
        raise ConfigError(
            f"--out {path} holds files distdpo did not write ({', '.join(names)}); "
            "choose a new directory (distdpo never overwrites files it did not create)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock(path)
        if not (path / MARKER).is_file():
            write_json_atomic(path / MARKER, {"written_by": f"distdpo {__version__}", "kind": kind})
    except PermissionError as e:
        raise ConfigError(
            f"cannot write --out {path}: {e.strerror} ({e.filename}); choose a directory you can write"
        ) from None
    return path


def lock(path: Path) -> None:
    """Take the directory's writer lock (held until the process exits); refuse if another process holds it."""
    path = path.resolve()
    if path in _held:
        return
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise ConfigError(
            f"another distdpo process (pid {holder}) is writing {path}; wait for it to finish, "
            "or write to another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _held[path] = fd


def release(path: str | Path) -> None:
    """Give the directory's writer lock back (the end of a command; a process exit does it too)."""
    fd = _held.pop(Path(path).resolve(), None)
    if fd is not None:
        os.close(fd)


__all__ = ["LOCK", "MARKER", "claim", "lock", "release"]
