"""Tokenized preference pairs and their summed completion log-probabilities.

A pair is packed into one sequence ``prompt ⊕ chosen ⊕ rejected`` with position
ids restarting after the prompt for the rejected part and a 4-D attention mask
in which rejected tokens cannot see chosen ones. The prompt — about two thirds
of the tokens in HH-RLHF — is thus computed once per pair instead of twice,
and chosen and rejected come out of the same forward pass. Each completion
token is predicted from the logits of the position before it in its own
branch (the first of both from the prompt's last token), so the result equals
two ordinary forward passes exactly (up to float round-off).

Packing relies on the architecture honouring position_ids and a custom 4-D
mask; where it does not (ALiBi models, flash attention, a sliding window shorter
than the packed rows, unknown types) the pairs go through two ordinary
right-padded forwards of the model instead, and through one unpadded forward
per sequence for a model whose outputs depend on padding.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from dataclasses import dataclass, field

import torch


@dataclass
class TokenizedPairs:
    """Token ids per pair; completions end with EOS; truncation counts say what was cut."""

    prompt: list[torch.Tensor]
    chosen: list[torch.Tensor]
    rejected: list[torch.Tensor]
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.prompt)

    def real_tokens(self, i: int) -> int:
        """Tokens of the pair in the usual two-sequence form (prompt+chosen, prompt+rejected)."""
        p = len(self.prompt[i])
        return 2 * p + len(self.chosen[i]) + len(self.rejected[i])


def tokenize_pairs(
    tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int
) -> TokenizedPairs:
    """Tokenize pairs, append EOS, and truncate each (prompt + completion) to ``max_length`` tokens.

    Truncation keeps the end of the prompt first (down to half the budget),
    then cuts the completions' ends; nothing is dropped silently: the counts
    of truncated prompts and completions are in ``stats``.
    """
    if max_length < 4:
        raise ValueError(f"policy.max_length must be at least 4, got {max_length}")
    eos = tokenizer.eos_token_id
    enc = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    P, C, R = enc(prompts), enc(chosen), enc(rejected)
    out = TokenizedPairs([], [], [], {"pairs": len(P), "truncated_prompts": 0, "truncated_completions": 0})
    for p, c, r in zip(P, C, R):
        c, r = c + [eos], r + [eos]
        if not p:
            p = [eos]  # the first completion token needs a position to be predicted from
        longest = max(len(c), len(r))
        if len(p) + longest > max_length:
            keep = max(max_length - longest, min(len(p), max_length // 2))
            if keep < len(p):
                p = p[-keep:]
                out.stats["truncated_prompts"] += 1
            room = max_length - len(p)
            if longest > room:
                c, r = c[:room], r[:room]
                out.stats["truncated_completions"] += 1
        out.prompt.append(torch.tensor(p, dtype=torch.long))
        out.chosen.append(torch.tensor(c, dtype=torch.long))
        out.rejected.append(torch.tensor(r, dtype=torch.long))
    return out


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    segments: torch.Tensor  # [B, T]: 0 prompt, 1 chosen, 2 rejected, -1 padding
    predict_from: torch.Tensor  # [M]: flat index (b*T + t) of the logits predicting each completion token
    targets: torch.Tensor  # [M] token ids
    owner: torch.Tensor  # [M]: 2*b for chosen tokens of pair b, 2*b + 1 for rejected
    real_tokens: int

    def to(self, device) -> "PackedBatch":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731
        return PackedBatch(
            move(self.input_ids),
            move(self.position_ids),
            move(self.segments),
            move(self.predict_from),
            move(self.targets),
            move(self.owner),
            self.real_tokens,
        )

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive [B, 1, T, T] mask: causal, no padding keys, rejected queries blind to chosen keys."""
        seg = self.segments
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool, device=seg.device).tril()
        allowed = causal[None] & (seg[:, None, :] >= 0)
        allowed &= ~((seg[:, :, None] == 2) & (seg[:, None, :] == 1))
        allowed |= torch.eye(T, dtype=torch.bool, device=seg.device)[None]  # padding rows attend to themselves
        mask = torch.zeros(allowed.shape, dtype=dtype, device=seg.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def pack(pairs: TokenizedPairs, indices: list[int], pad_id: int) -> PackedBatch:
    """Pack the pairs ``indices`` (right-padded) for one forward pass."""
    lengths = [len(pairs.prompt[i]) + len(pairs.chosen[i]) + len(pairs.rejected[i]) for i in indices]
    B, T = len(indices), max(lengths)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, T), dtype=torch.long)
    segments = torch.full((B, T), -1, dtype=torch.long)
    predict, targets, owner = [], [], []
    real = 0
    for b, i in enumerate(indices):
        p, c, r = pairs.prompt[i], pairs.chosen[i], pairs.rejected[i]
        lp, lc, lr = len(p), len(c), len(r)
        input_ids[b, : lp + lc + lr] = torch.cat([p, c, r])
        position_ids[b, : lp + lc] = torch.arange(lp + lc)
        position_ids[b, lp + lc : lp + lc + lr] = torch.arange(lp, lp + lr)
        segments[b, :lp], segments[b, lp : lp + lc], segments[b, lp + lc : lp + lc + lr] = 0, 1, 2
        base = b * T
        predict.append(base + torch.arange(lp - 1, lp - 1 + lc))
        predict.append(base + torch.cat([torch.tensor([lp - 1]), torch.arange(lp + lc, lp + lc + lr - 1)]))
        targets += [c, r]
        owner += [torch.full((lc,), 2 * b), torch.full((lr,), 2 * b + 1)]
        real += pairs.real_tokens(i)
    return PackedBatch(
        input_ids, position_ids, segments, torch.cat(predict), torch.cat(targets), torch.cat(owner), real
    )


# Architectures (config.model_type) whose body honours custom position_ids and a 4-D additive mask under eager or
# SDPA attention, and whose logits are the LM head of the last hidden state up to `_postprocess_logits`; each is
# checked against a plain forward in tests/test_logprobs_architectures.py. Others (ALiBi: Bloom, MPT, Falcon with
# alibi; local attention under another name: GPT-Neo; unknown types) take the padded path.
PACKABLE_MODEL_TYPES = frozenset(
    {
        "gpt2",
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "granite",
        "granitemoe",
        "cohere",
        "cohere2",
        "phi",
        "phi3",
        "gpt_neox",
        "olmo",
        "olmo2",
        "stablelm",
        "falcon",
        "starcoder2",
        "opt",
        "gptj",
        "codegen",
        "smollm3",
    }
)
PACKABLE_ATTENTION = ("eager", "sdpa")  # flash attention takes no 4-D mask, flex attention a BlockMask

# How `pair_logps` computes, fastest first; a model gets the first that agreed with plain forwards on first use.
PACKED, PADDED, LOOP = "packed", "padded", "loop"
_checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # transformers model -> PACKED | PADDED | LOOP


def unwrap(model):
    """The transformers model under a `peft` wrapper (the model itself otherwise)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _text_config(model):
    config = unwrap(model).config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def backbone_and_head(model):
    """The transformer body and the LM head of a causal LM (a `peft` wrapper is looked through)."""
    inner = unwrap(model)
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def _postprocess_logits(logits: torch.Tensor, config) -> torch.Tensor:
    """What the architecture's own forward does to ``head(hidden)``.

    Cohere's scale, Granite's divisor, Gemma 2/3's soft cap.
    """
    if (scale := getattr(config, "logit_scale", None)) is not None:
        logits = logits * scale
    if (divisor := getattr(config, "logits_scaling", None)) is not None:
        logits = logits / divisor
    if (cap := getattr(config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def packing_supported(model) -> bool:
    """Whether the architecture and attention implementation admit the packed layout at all."""
    config = _text_config(model)
    return (
        config.model_type in PACKABLE_MODEL_TYPES
        and getattr(config, "_attn_implementation", None) in PACKABLE_ATTENTION
        and not getattr(config, "alibi", False)
    )  # Falcon's ALiBi variant ignores position_ids


def logp_path(model, batch: PackedBatch) -> str:
    """How `pair_logps` computes this batch: PACKED, PADDED (two right-padded forwards per pair) or LOOP (one
    unpadded forward per sequence). On a model's first use each candidate is checked on one pair of ``batch``
    against plain forwards; a packed model still pads a batch whose rows reach its sliding window (a custom 4-D
    mask replaces the window, and packing stretches distances)."""
    inner = unwrap(model)
    if inner not in _checked:
        _checked[inner] = _self_check(model, batch)
    path = _checked[inner]
    window = _sliding_window(model)
    return PADDED if path == PACKED and window and batch.input_ids.shape[1] >= window else path


def _sliding_window(model) -> int | None:
    config = _text_config(model)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return window or None  # Qwen2-MoE writes 0 for "no window"


@torch.no_grad()
def _self_check(model, batch: PackedBatch) -> str:
    """The fastest path whose log-probs of the batch's first pair (completions made unequal in length, so that
    padding occurs) agree with unpadded forwards, in eval mode and the model's own dtype."""
    seg, ids = batch.segments[0].cpu(), batch.input_ids[0].cpu()
    p, c, r = ids[seg == 0], ids[seg == 1], ids[seg == 2]
    if window := _sliding_window(model):  # the packed check pair must fit in the window
        n = max(1, (window - 1) // 3)
        p, c, r = p[-n:], c[:n], r[:n]
    if len(c) == len(r) and len(r) > 1:
        r = r[:-1]
    one = pack(TokenizedPairs([p], [c], [r]), [0], pad_id=0).to(batch.input_ids.device)
    half = next(model.parameters()).dtype in (torch.float16, torch.bfloat16)
    tol = (5e-2 if half else 1e-3) * (len(c) + len(r))  # per completion token
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout would make any two differ
    try:
        plain = torch.stack(_loop_logps(model, one, None))
        candidates = ([PACKED] if packing_supported(model) else []) + [PADDED]
        for path in candidates:
            try:
                error = float((torch.stack(_PATHS[path](model, one, None)) - plain).abs().max())
                if error <= tol:  # False for NaN too
                    return path
                why = f"off by {error:.3g} nats"
            except Exception as e:  # noqa: BLE001 - e.g. a transformers version that rejects a 4-D mask
                why = f"{type(e).__name__}: {e}"
            warnings.warn(
                f"{path} log-probs of model_type {_text_config(model).model_type!r} disagree with plain "
                f"forwards ({why}); using a slower path",
                RuntimeWarning,
            )
        return LOOP
    finally:
        for m, training in modes:
            m.training = training


def _packed_logps(model, batch: PackedBatch, autocast_dtype: torch.dtype | None):
    device = batch.input_ids.device
    mask_dtype = autocast_dtype or next(model.parameters()).dtype
    body, head = backbone_and_head(model)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden = body(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask(mask_dtype),
            use_cache=False,
        ).last_hidden_state
        # The LM head only where a completion token is predicted: prompt positions need no vocabulary logits.
        flat = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_from)).float()
    flat = _postprocess_logits(flat, _text_config(model))
    token_logps = torch.log_softmax(flat, dim=-1).gather(1, batch.targets[:, None]).squeeze(1)
    B = batch.input_ids.shape[0]
    sums = torch.zeros(2 * B, dtype=token_logps.dtype, device=device).index_add(0, batch.owner, token_logps)
    return sums[0::2], sums[1::2]


def _unpacked(batch: PackedBatch):
    """Rows prompt+chosen (0..B-1) then prompt+rejected (B..2B-1), right-padded with token 0; prompt and full
    lengths ``[2B, 1]``."""
    seg = batch.segments
    T = seg.shape[1]
    lp, lc, lr = ((seg == s).sum(1) for s in range(3))
    prompt = torch.cat([lp, lp])[:, None]
    lengths = torch.cat([lp + lc, lp + lr])[:, None]
    j = torch.arange(int(lengths.max()), device=seg.device)[None]
    skip = torch.cat([torch.zeros_like(lc), lc])[:, None]  # a rejected row jumps over the chosen tokens
    src = torch.where(j < prompt, j, j + skip).clamp(max=T - 1)
    ids = torch.where(j < lengths, batch.input_ids.repeat(2, 1).gather(1, src), 0)
    return ids, prompt, lengths


def _padded_logps(model, batch: PackedBatch, autocast_dtype: torch.dtype | None):
    """Two ordinary right-padded sequences per pair through ``model(...)``, so that its own positions, mask
    handling, head and logit post-processing apply."""
    ids, prompt, lengths = _unpacked(batch)
    B, L, device = batch.input_ids.shape[0], ids.shape[1], ids.device
    # Position t predicts token t + 1: no logits are needed before the shortest prompt's last token.
    first = int(prompt.min()) - 1
    kwargs = (
        {"logits_to_keep": L - first} if "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters else {}
    )
    attention_mask = (torch.arange(L, device=device)[None] < lengths).long()
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids, attention_mask=attention_mask, use_cache=False, **kwargs).logits
    logits = logits[:, logits.shape[1] - (L - first) :]  # positions first .. L-1, whether or not it kept only those
    t = torch.arange(first, L - 1, device=device)[None]
    rows, cols = ((t >= prompt - 1) & (t < lengths - 1)).nonzero(as_tuple=True)
    token_logps = (
        torch.log_softmax(logits[rows, cols].float(), dim=-1).gather(1, ids[rows, first + cols + 1][:, None]).squeeze(1)
    )
    sums = torch.zeros(2 * B, dtype=token_logps.dtype, device=device).index_add(0, rows, token_logps)
    return sums[:B], sums[B:]


def _loop_logps(model, batch: PackedBatch, autocast_dtype: torch.dtype | None):
    """One unpadded ``model(input_ids)`` forward per sequence: for models whose outputs depend on padding."""
    ids, prompt, lengths = _unpacked(batch)
    out = []
    for row, lp, n in zip(ids, prompt[:, 0].tolist(), lengths[:, 0].tolist()):
        with torch.autocast(ids.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            seq = row[None, :n]  # unpadded: the all-ones mask only says so (transformers warns without one)
            output = model(input_ids=seq, attention_mask=torch.ones_like(seq), use_cache=False)
            logits = output.logits[0, lp - 1 : n - 1]
        out.append(torch.log_softmax(logits.float(), dim=-1).gather(1, row[lp:n, None]).sum())
    sums = torch.stack(out)
    B = batch.input_ids.shape[0]
    return sums[:B], sums[B:]


_PATHS = {PACKED: _packed_logps, PADDED: _padded_logps, LOOP: _loop_logps}


def pair_logps(
    model, batch: PackedBatch, autocast_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(chosen|prompt) and log π(rejected|prompt) of every pair, ``[B]`` each, in float32.

    They equal what ``model(prompt + completion).logits`` gives; `logp_path` says how they are computed.
    """
    return _PATHS[logp_path(model, batch)](model, batch, autocast_dtype)


@torch.no_grad()
def sequence_logp_loop(model, prompt: torch.Tensor, completion: torch.Tensor) -> float:
    """log π(completion|prompt) one example at a time, summed token by token (the independent check)."""
    ids = torch.cat([prompt, completion])[None]
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].double()
    total = 0.0
    for t in range(len(completion)):
        pos = len(prompt) - 1 + t
        total += float(torch.log_softmax(logits[pos], dim=-1)[completion[t]])
    return total
