"""Tokenized preference pairs and their summed completion log-probabilities.

A pair is packed into one sequence ``prompt ⊕ chosen ⊕ rejected`` with position
ids restarting after the prompt for the rejected part and a 4-D attention mask
in which rejected tokens cannot see chosen ones. The prompt — about two thirds
of the tokens in HH-RLHF — is thus computed once per pair instead of twice,
and chosen and rejected come out of the same forward pass. Each completion
token is predicted from the logits of the position before it in its own
branch (the first of both from the prompt's last token), so the result equals
two ordinary forward passes exactly (up to float round-off).
"""

from __future__ import annotations

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


def tokenize_pairs(tokenizer, prompts: list[str], chosen: list[str], rejected: list[str], max_length: int) -> TokenizedPairs:
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
        return PackedBatch(move(self.input_ids), move(self.position_ids), move(self.segments), move(self.predict_from),
                           move(self.targets), move(self.owner), self.real_tokens)

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
    return PackedBatch(input_ids, position_ids, segments, torch.cat(predict), torch.cat(targets), torch.cat(owner), real)


def backbone_and_head(model):
    """The transformer body and the LM head of a causal LM (a `peft` wrapper is looked through)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(inner, inner.base_model_prefix), inner.get_output_embeddings()


def pair_logps(model, batch: PackedBatch, autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log π(chosen|prompt) and log π(rejected|prompt) of every pair, ``[B]`` each, in float32."""
    device = batch.input_ids.device
    mask_dtype = autocast_dtype or next(model.parameters()).dtype
    body, head = backbone_and_head(model)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        hidden = body(input_ids=batch.input_ids, position_ids=batch.position_ids,
                      attention_mask=batch.attention_mask(mask_dtype), use_cache=False).last_hidden_state
        # The LM head only where a completion token is predicted: prompt positions need no vocabulary logits.
        flat = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.predict_from)).float()
    token_logps = torch.log_softmax(flat, dim=-1).gather(1, batch.targets[:, None]).squeeze(1)
    B = batch.input_ids.shape[0]
    sums = torch.zeros(2 * B, dtype=token_logps.dtype, device=device).index_add(0, batch.owner, token_logps)
    return sums[0::2], sums[1::2]


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
