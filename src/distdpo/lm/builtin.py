"""Built-in small models that run offline: random-init GPT-2 / Llama configs and a byte-level BPE
tokenizer trained on the run's own training text with `tokenizers`.

They exist so that examples, tests and benchmarks need no hub: a user with the hub
sets ``policy.model = "distilgpt2"`` (or a local path) instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"

# name → (config class, model class, config kwargs): small enough to train on a laptop CPU in minutes.
BUILTIN = {
    "gpt2-tiny": (GPT2Config, GPT2LMHeadModel, dict(n_layer=2, n_head=4, n_embd=128, n_positions=1024)),
    "llama-tiny": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=128,
            intermediate_size=344,
            max_position_embeddings=1024,
        ),
    ),
}


def is_builtin(model: str) -> bool:
    return model.startswith("builtin:")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2 style) trained on ``texts``; EOS doubles as padding."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False
    )
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    tok.model_max_length = 1 << 30  # truncation is ours (keep the end of the prompt), not the tokenizer's
    return tok


def build_model(name: str, vocab_size: int, seed: int, dtype: torch.dtype = torch.float32):
    """Random-init model ``builtin:<name>`` with a vocabulary of ``vocab_size`` (seeded, reproducible)."""
    key = name.removeprefix("builtin:")
    if key not in BUILTIN:
        raise ValueError(
            f"unknown built-in model {name!r}; expected one of {', '.join('builtin:' + k for k in BUILTIN)}"
        )
    config_cls, model_cls, kwargs = BUILTIN[key]
    config = config_cls(vocab_size=vocab_size, bos_token_id=0, eos_token_id=0, pad_token_id=0, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(dtype)


def text_fingerprint(texts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def tokenizer_texts(path: str | Path) -> list[str]:
    """The texts a built-in tokenizer is trained on: a preference file's prompts and completions (any format
    distdpo reads), or the lines of a plain-text file."""
    from distdpo.data.text import load_preferences

    path = Path(path).expanduser()
    if path.suffix in (".txt", ".text", ".md"):
        return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    data = load_preferences(path)
    return [t for triple in zip(data.prompt, data.chosen, data.rejected) for t in triple]


def init_model(name: str, texts: list[str], out: str | Path, *, vocab_size: int = 4096, seed: int = 0) -> Path:
    """Create built-in model ``name`` once (random init with ``seed``, BPE trained on ``texts``) and write it as a
    ``save_pretrained`` directory that every site loads with ``policy.model = out`` (no site's data needed)."""
    from distdpo.io import directory_atomic

    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"--out {out} already exists and is not an empty directory; choose a new directory")
    tokenizer = train_tokenizer(texts, vocab_size)
    model = build_model(name, len(tokenizer), seed)
    with directory_atomic(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
