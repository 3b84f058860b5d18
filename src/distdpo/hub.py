"""Telling a local path from a Hugging Face hub id, and failing fast (one request, no retries) when the hub
cannot provide an id: offline mode, no connection, or no such repository."""

from __future__ import annotations

import os
from pathlib import Path

from distdpo.config import ConfigError

PROBE_TIMEOUT_S = 5.0


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def looks_like_path(name: str) -> bool:
    """A name that can only mean a local path (a hub id is ``name`` or ``owner/name``)."""
    return name.startswith(("/", "./", "../", "~", ".\\")) or name.count("/") > 1 or "\\" in name or name.endswith("/")


def check_hub_id(key: str, name: str, kind: str) -> None:
    """Raise a ConfigError naming ``key`` unless the hub can serve ``name`` (``kind``: "model" or "dataset")."""
    local_hint = f"give a local path, or download it where the hub is reachable and point {key} at that copy"
    if looks_like_path(name):
        raise ConfigError(f"{key} = {name!r}: no such file or directory")
    if offline():
        raise ConfigError(
            f"{key} = {name!r} is not a local path, and HF_HUB_OFFLINE is set so the Hugging Face hub "
            f"is not asked (and the id is not in the local cache); {local_hint}"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    api = HfApi()
    info = api.model_info if kind == "model" else api.dataset_info
    try:
        info(name, timeout=PROBE_TIMEOUT_S)
    except GatedRepoError:
        return  # exists; the download says what access it needs
    except RepositoryNotFoundError:
        raise ConfigError(f"{key} = {name!r}: no such {kind} on the Hugging Face hub, and no such local path") from None
    except HFValidationError:
        raise ConfigError(f"{key} = {name!r}: not a local path and not a valid hub id") from None
    except Exception as e:  # connection refused, DNS failure, timeout, proxy: the hub is unreachable
        raise ConfigError(
            f"{key} = {name!r} is not a local path, and the Hugging Face hub is unreachable "
            f"({type(e).__name__}); {local_hint}"
        ) from None


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


__all__ = ["check_hub_id", "is_local", "looks_like_path", "offline"]
