"""Compressed messages: compressors with their wire format, and error feedback for client uploads.

A compressor turns rows ``[r, p]`` into byte rows ``[r, B]`` (the payload that travels: values, indices,
scales) and back; B is fixed by the compressor, p and the dtype, so ``bytes_communicated`` counts exactly what
an engine sends. Every engine decodes the same bytes the same way, so sender and receivers agree bit for bit.

* ``none``: the row itself (p values).
* ``topk:f``: the k = max(1, round(f·p)) largest |x_j| (k values + k int32 indices). Biased.
* ``randk:f``: k coordinates drawn uniformly, scaled by p/k (unbiased); k values + k int32 indices.
  Either is sent densely (p values) where that is not larger.
* ``int8``: per chunk of 256 coordinates a scale s = max|x_j| and codes round(127·x_j/s) (one byte each),
  plus one scale per chunk. Biased.
* ``qsgd:s``: per chunk the scale ‖x‖₂ and levels ⌊s·|x_j|/‖x‖₂ + u_j⌋ with u_j ~ U[0, 1) (unbiased, Alistarh
  et al. 2017), stored with the sign in 2, 4 or 8 bits (s = 1, ≤ 7, ≤ 127), plus one scale per chunk.

With error feedback or public copies a compressor must be contractive (‖Q(x) − x‖² ≤ (1 − δ)‖x‖²): there the
unbiased ones are scaled by 1/(1 + ω), ω their variance factor (Koloskova et al. 2019): rand-k is then sent
unscaled (ω = p/k − 1) and qsgd decoded times 1/(1 + min(c/s², √c/s)) for chunks of c coordinates.

Random compressors draw from one stream per (seed, call, node) (:class:`Draws`): an engine part draws only its
own rows, and every engine draws the same numbers for a node.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CHUNK = 256  # coordinates sharing one scale (int8, qsgd)
INDEX = torch.int32  # sparse indices on the wire
BIASED = ("topk", "int8")


def parse(spec: str) -> tuple[str, float]:
    """``"topk:0.1"`` → ``("topk", 0.1)``; ``"int8"`` / ``"none"`` → ``(name, 0.0)`` (config checked the text)."""
    name, _, arg = spec.partition(":")
    return name, float(arg) if arg else 0.0


def resolve_feedback(spec: str, feedback: str) -> str:
    """``algorithm.error_feedback`` as run: ``"auto"`` is EF21 for the biased compressors and none otherwise."""
    if feedback != "auto":
        return feedback
    return "ef21" if parse(spec)[0] in BIASED else "none"


def _as_bytes(*parts: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.contiguous().view(torch.uint8) for t in parts], dim=1)  # [r, k] → [r, k · itemsize]


def _field(buf: torch.Tensor, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    out = torch.empty(len(buf), stop - start, dtype=torch.uint8, device=buf.device)  # offset and strides fit dtype
    return out.copy_(buf[:, start:stop]).view(dtype)


class Compressor:
    """Encodes rows ``[r, p]`` of ``dtype`` into payload rows ``[r, nbytes]`` (uint8) and decodes them."""

    def __init__(self, spec: str, num_params: int, dtype: torch.dtype, contractive: bool = False):
        self.spec, self.p, self.dtype = spec, num_params, dtype
        self.name, arg = parse(spec)
        self.item = torch.tensor([], dtype=dtype).element_size()
        self.random = self.name in ("randk", "qsgd")
        self.biased = self.name in BIASED
        p, omega = num_params, 0.0  # ω: the variance factor of the unbiased compressors
        if self.name in ("topk", "randk"):
            self.k = min(p, max(1, int(arg * p + 0.5)))
            self.dense = self.k * (self.item + INDEX.itemsize) >= p * self.item
            self.nbytes = p * self.item if self.dense else self.k * (self.item + INDEX.itemsize)
            omega = p / self.k - 1 if self.name == "randk" else 0.0
        elif self.name in ("int8", "qsgd"):
            self.levels = s = 127 if self.name == "int8" else int(arg)
            self.bits = 2 if s == 1 else 4 if s <= 7 else 8
            self.chunks = math.ceil(p / CHUNK)
            self.code_bytes = math.ceil(p * self.bits / 8)
            self.nbytes = self.code_bytes + self.chunks * self.item
            c = min(p, CHUNK)
            omega = min(c / s**2, math.sqrt(c) / s) if self.name == "qsgd" else 0.0
        else:
            self.nbytes = p * self.item
        self.shrink = 1 / (1 + omega) if contractive else 1.0

    def __call__(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """Q(x): what a receiver decodes."""
        return self.decode(self.encode(x, u))

    def encode(self, x: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        if u is not None:
            u = u.to(x.device)
        if self.name in ("topk", "randk"):
            return self._encode_sparse(x, u)
        if self.name in ("int8", "qsgd"):
            return self._encode_quantized(x, u)
        return _as_bytes(x)

    def decode(self, buf: torch.Tensor) -> torch.Tensor:
        if self.name in ("topk", "randk") and not self.dense:
            k, item = self.k, self.item
            values = _field(buf, 0, k * item, self.dtype)
            index = _field(buf, k * item, self.nbytes, INDEX).long()
            return torch.zeros(len(buf), self.p, dtype=self.dtype, device=buf.device).scatter_(1, index, values)
        if self.name in ("int8", "qsgd"):
            return self._decode_quantized(buf)
        return _field(buf, 0, self.nbytes, self.dtype)

    # ---- sparsifiers

    def _encode_sparse(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        if self.k == self.p and self.name == "topk":
            return _as_bytes(x)
        keys = x.abs() if self.name == "topk" else u
        index = keys.topk(self.k, dim=1).indices.sort(dim=1).values
        values = x.gather(1, index)
        if self.name == "randk" and self.shrink == 1.0:  # contractive rand-k (shrink k/p) sends values as they are
            values = values * (self.p / self.k)
        if self.dense:
            return _as_bytes(torch.zeros_like(x).scatter_(1, index, values))
        return _as_bytes(values, index.to(INDEX))

    # ---- quantizers: a scale per chunk, signed levels packed into `bits`-bit codes

    def _encode_quantized(self, x: torch.Tensor, u: torch.Tensor | None) -> torch.Tensor:
        r, s = x.shape[0], self.levels
        pad = self.chunks * CHUNK - self.p
        xc = F.pad(x, (0, pad)).reshape(r, self.chunks, CHUNK)
        scale = xc.abs().amax(-1) if self.name == "int8" else xc.norm(dim=-1)
        y = xc.abs() / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None] * s
        if u is None:
            level = y.round()
        else:
            level = (y + F.pad(u, (0, pad)).reshape(r, self.chunks, CHUNK).to(y)).floor()
        code = (torch.sign(xc) * level.clamp(0, s) + s).reshape(r, self.chunks * CHUNK)[:, : self.p].to(torch.uint8)
        return _as_bytes(self._pack(code), scale.to(self.dtype))

    def _decode_quantized(self, buf: torch.Tensor) -> torch.Tensor:
        r, s = len(buf), self.levels
        code = self._unpack(buf[:, : self.code_bytes])
        scale = _field(buf, self.code_bytes, self.nbytes, self.dtype)
        signed = F.pad(code.to(self.dtype) - s, (0, self.chunks * CHUNK - self.p)).reshape(r, self.chunks, CHUNK)
        shrink = self.shrink if self.name == "qsgd" else 1.0
        return (signed * (scale[..., None] * (shrink / s))).reshape(r, self.chunks * CHUNK)[:, : self.p]

    def _pack(self, code: torch.Tensor) -> torch.Tensor:
        per = 8 // self.bits
        if per == 1:
            return code
        code = F.pad(code, (0, (-code.shape[1]) % per))
        code = code.reshape(code.shape[0], code.shape[1] // per, per).to(torch.int32)
        shifts = torch.arange(per, device=code.device, dtype=torch.int32) * self.bits
        return (code << shifts).sum(-1).to(torch.uint8)

    def _unpack(self, packed: torch.Tensor) -> torch.Tensor:
        per = 8 // self.bits
        if per == 1:
            return packed
        shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * self.bits
        code = (packed.to(torch.int32)[..., None] >> shifts) & ((1 << self.bits) - 1)
        return code.reshape(packed.shape[0], packed.shape[1] * per)[:, : self.p]


class Draws:
    """The uniform numbers of random compressors: per call, one stream per node, seeded by (seed, call, node)."""

    def __init__(self, seed: int):
        self.seed, self.calls = seed, 0

    def __call__(self, q: Compressor, nodes: torch.Tensor) -> torch.Tensor | None:
        """``[len(nodes), p]`` numbers in [0, 1) for ``q`` (None if it draws none); every call counts."""
        self.calls += 1
        if not q.random:
            return None
        rows = torch.empty(len(nodes), q.p, dtype=torch.float64)
        for row, node in zip(rows, nodes.tolist()):
            stream = ((self.seed * 1_000_003 + self.calls) * 1_000_003 + node) % 2**63
            torch.rand(q.p, generator=torch.Generator().manual_seed(stream), dtype=torch.float64, out=row)
        return rows

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"compress.calls": torch.tensor(self.calls)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.calls = int(state["compress.calls"])


class Uplink:
    """Client → server updates, compressed, with the sender's error feedback; its state is the algorithm's.

    * ``none``: the client sends Q(Δ_i).
    * ``ef`` (Seide et al. 2014; Karimireddy et al. 2019): the client keeps e_i, sends Q(e_i + Δ_i) and sets
      e_i ← e_i + Δ_i − Q(e_i + Δ_i).
    * ``ef21`` (Richtárik et al. 2021): client and server keep h_i, the client sends q_i = Q(Δ_i − h_i), both set
      h_i ← h_i + q_i, and the server aggregates the h_i. With heterogeneous clients Δ_i(θ★) ≠ 0, so ``ef``'s
      residuals keep moving θ around θ★ while ``ef21``'s messages vanish there: no compression floor.

    h is replicated (every engine part receives every message); e stays with the part holding the client.
    """

    def __init__(self, compressor: Compressor, feedback: str, comm, *, seed: int, device: torch.device):
        self.q, self.feedback, self.comm = compressor, feedback, comm
        self.draws = Draws(seed)
        shape = {"ef": len(comm.local_nodes), "ef21": comm.num_nodes}.get(feedback)
        self.memory = None if shape is None else torch.zeros(shape, compressor.p, dtype=compressor.dtype, device=device)

    def send(self, delta: torch.Tensor, nodes: torch.Tensor, rows: torch.Tensor, sampled: torch.Tensor):
        """The sampled clients' decoded updates ``[S, p]`` in ``sampled`` order, on every engine part.

        ``delta``: the updates of this part's sampled clients (global ids ``nodes``, local ``rows``)."""
        u = self.draws(self.q, nodes)
        if self.feedback == "ef":
            v = self.memory[rows] + delta
        elif self.feedback == "ef21":
            v = delta - self.memory[nodes.to(delta.device)]
        else:
            v = delta
        payload = self.q.encode(v, u)
        if self.feedback == "ef":
            self.memory[rows] = v - self.q.decode(payload)
        decoded = self.q.decode(self.comm.gather_rows(payload, sampled))
        if self.feedback == "ef21":
            at = sampled.to(decoded.device)
            decoded = self.memory[at] + decoded
            self.memory[at] = decoded
        return decoded

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = self.draws.state_dict()
        if self.memory is not None:
            state["compress.memory"] = self.memory
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.draws.load_state_dict(state)
        if self.memory is not None:
            self.memory = state["compress.memory"].to(self.memory)
