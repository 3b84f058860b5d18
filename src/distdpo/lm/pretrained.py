"""Loading causal LMs: a local model directory or hub id, a PEFT adapter on its base, or a distdpo export.

A distdpo export (see :mod:`distdpo.lm.export`) is a ``save_pretrained`` model directory, or a PEFT adapter
directory whose ``distdpo.json`` says where its base is: ``base_dir`` (a folder inside the export, for a model
that exists nowhere else) or ``base_model`` (the hub id or path it was trained from). A plain PEFT adapter
directory names its base in ``adapter_config.json``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path

from distdpo.config import ConfigError
from distdpo.hub import check_hub_id, is_local

EXPORT_INFO = "distdpo.json"
ADAPTER_CONFIG = "adapter_config.json"


@contextlib.contextmanager
def quiet_transformers():
    """No per-file progress bars and no deprecation chatter from transformers and peft while loading or saving."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def load_pretrained(name: str, key: str):
    """A causal LM and its tokenizer from a local directory or a hub id (the local cache first); ``key`` names the
    setting or option in errors. The tokenizer pads with EOS when it has no padding token."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
            return AutoModelForCausalLM.from_pretrained(source, local_files_only=local_only), tok

    source = str(Path(name).expanduser()) if is_local(name) else name
    try:
        lm, tok = load(True)  # a local directory, or a hub id already in the local cache
    except (OSError, ValueError) as e:
        if is_local(name):
            raise ConfigError(f"{key} = {name!r}: cannot load a causal LM from that directory ({e})") from None
        check_hub_id(key, name, "model")  # fails fast, naming why, when the hub cannot serve it
        try:
            lm, tok = load(False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load {key} = {name!r} from the Hugging Face hub: {e}") from None
    return lm, _pads(tok)


def _pads(tok):
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def is_adapter_dir(name: str) -> bool:
    return (Path(name).expanduser() / ADAPTER_CONFIG).is_file()


def export_info(path: str | Path) -> dict:
    """The ``distdpo.json`` of an export directory ({} for a directory distdpo did not export)."""
    try:
        info = json.loads((Path(path).expanduser() / EXPORT_INFO).read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def adapter_base(adapter: str, key: str) -> str:
    """Where the base model of the adapter directory ``adapter`` is: the export's own, or the one peft recorded."""
    folder = Path(adapter).expanduser()
    info = export_info(folder)
    if info.get("base_dir"):
        return str((folder / info["base_dir"]).resolve())
    if info.get("base_model"):
        return info["base_model"]
    try:
        base = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{key} = {adapter!r}: cannot read its {ADAPTER_CONFIG} ({e})") from None
    if not base:
        raise ConfigError(f"{key} = {adapter!r}: the adapter does not name its base model; give the base as the model")
    return base


def with_adapter(model, adapter: str, key: str):
    """``model`` wrapped in the PEFT adapter at ``adapter`` (a local directory or a hub id)."""
    from peft import PeftModel

    if not is_local(adapter):
        check_hub_id(key, adapter, "model")
    elif not is_adapter_dir(adapter):
        raise ConfigError(f"{key} = {adapter!r}: no {ADAPTER_CONFIG} there; expected a PEFT adapter directory")
    try:
        with quiet_transformers():
            return PeftModel.from_pretrained(model, str(Path(adapter).expanduser()) if is_local(adapter) else adapter)
    except (OSError, ValueError, RuntimeError, KeyError) as e:  # peft's missing files, shape and key mismatches
        raise ConfigError(f"{key} = {adapter!r}: cannot apply the adapter to its base model ({e})") from None


def load_model(name: str, key: str, *, adapter: str | None = None, adapter_key: str = "--adapter"):
    """(model, tokenizer, whether the model carries an adapter) for ``name``: a model directory or hub id, an
    adapter directory or distdpo export (loaded on its base), optionally with a separate ``adapter``. The tokenizer
    is the adapter directory's when it holds one."""
    if is_local(name) and is_adapter_dir(name):
        if adapter:
            raise ConfigError(f"{key} = {name!r} is an adapter directory already; give its base model as {key}")
        name, adapter, adapter_key = adapter_base(name, key), name, key
    model, tokenizer = load_pretrained(name, key)
    if not adapter:
        return model, tokenizer, False
    if is_local(adapter) and (Path(adapter).expanduser() / "tokenizer_config.json").is_file():
        tokenizer = load_tokenizer(adapter, adapter_key)
    return with_adapter(model, adapter, adapter_key), tokenizer, True


def load_tokenizer(name: str, key: str):
    """The tokenizer saved in a local directory (next to an adapter)."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            tok = AutoTokenizer.from_pretrained(str(Path(name).expanduser()), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key} = {name!r}: cannot load its tokenizer ({e})") from None
    return _pads(tok)


def load_merged(name: str, key: str):
    """A model to train from: an adapter (or an export holding one) is merged into its base."""
    model, tokenizer, adapted = load_model(name, key)
    if adapted:
        with quiet_transformers():
            model = model.merge_and_unload()
    return model, tokenizer


def load_reference(name: str, tokenizer, key: str = "policy.reference_model"):
    """The reference model ``name`` (an adapter merged into its base), which must share the policy's tokenizer:
    the reference scores the very token ids the policy does."""
    if name.startswith("builtin:"):
        raise ConfigError(
            f"{key} = {name!r}: a built-in model is randomly initialised, so it makes no reference; give a local "
            "path, a distdpo export directory or a hub id (or '' for the policy's own starting model)"
        )
    model, ref_tokenizer = load_merged(name, key)
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{key} = {name!r} has another tokenizer than policy.model ({len(ref_tokenizer)} vs {len(tokenizer)} "
            "tokens); the reference must share the policy's tokenizer"
        )
    return model


__all__ = [
    "ADAPTER_CONFIG",
    "EXPORT_INFO",
    "adapter_base",
    "export_info",
    "load_merged",
    "load_model",
    "load_reference",
]
