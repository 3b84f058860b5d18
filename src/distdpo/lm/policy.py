"""A Hugging Face causal LM as a DPO policy whose trainable part is one flat vector.

With LoRA (``lora_r > 0``) the trainable part is the `peft` adapter and the
reference policy is the same model with the adapter disabled; with full
fine-tuning it is every weight and the reference is a frozen copy; a separate
reference model (``policy.reference_model``) replaces either. With ``freeze_a`` the adapter's A matrices stay at
their seeded initialisation and only the B's are trainable (FFA-LoRA). Engines only ever
see the flat vector: that is what nodes hold, average and send.
"""

from __future__ import annotations

import copy
import hashlib
import warnings

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distdpo.config import ConfigError
from distdpo.lm.builtin import BUILTIN, build_model, is_builtin, train_tokenizer
from distdpo.lm.logprobs import PackedBatch, pair_logps
from distdpo.lm.pretrained import load_merged


def load_model_and_tokenizer(
    model: str, *, training_texts=None, vocab_size: int = 4096, seed: int = 0, key: str = "policy.model"
):
    """``builtin:<name>`` (random init + BPE trained on ``training_texts``), a local path, a hub id, or a distdpo
    export / PEFT adapter directory (merged into its base: training continues from that model)."""
    if is_builtin(model):
        if model.removeprefix("builtin:") not in BUILTIN:
            raise ConfigError(
                f"{key} = {model!r}: no such built-in model; expected one of "
                f"{', '.join('builtin:' + k for k in BUILTIN)}"
            )
        if training_texts is None:
            raise ValueError("a built-in model needs training texts for its tokenizer")
        tok = train_tokenizer(training_texts, vocab_size)
        return build_model(model, len(tok), seed), tok
    return load_merged(model, key)


class CausalLMPolicy:
    """The model, its reference, and the flat view of its trainable parameters."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        lora_r: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.0,
        target_modules: list[str] | None = None,
        device: torch.device | str = "cpu",
        seed: int = 0,
        reference=None,
        freeze_a: bool = False,
    ):
        """``reference``: a model (sharing ``tokenizer``) whose log-probs are the reference's, instead of the
        policy's own starting model."""
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.autocast_dtype = torch.bfloat16 if self.device.type == "cuda" else None
        model = model.to(self.device)
        # Dropout off (as TRL's disable_dropout): gradients are then deterministic, so engines can agree exactly.
        model.eval()
        self.lora = lora_r > 0
        if self.lora:
            from peft import LoraConfig, get_peft_model

            config = LoraConfig(
                r=lora_r,
                lora_alpha=lora_alpha,
                lora_dropout=lora_dropout,
                target_modules=target_modules or None,
                task_type="CAUSAL_LM",
                fan_in_fan_out=model.config.model_type == "gpt2",
            )  # GPT-2 stores Conv1D weights transposed
            # peft draws the adapter's A matrices from the global RNG: seed it here, or every process (and every
            # torchrun rank) would start from a different adapter.
            with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
                warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' noise from inside peft
                warnings.filterwarnings("ignore", message="fan_in_fan_out")
                torch.manual_seed(seed)
                self.model = get_peft_model(model, config)
            self.model.eval()
            if freeze_a:  # left out of the flat vector: never trained, averaged or sent
                for name, p in self.model.named_parameters():
                    if ".lora_A." in name:
                        p.requires_grad_(False)
            self.reference_model = None
        else:
            self.model = model
            self.reference_model = copy.deepcopy(model) if reference is None else None
        if reference is not None:
            self.reference_model = reference.to(self.device)
        if self.reference_model is not None:
            self.reference_model.eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.pad_id = tokenizer.pad_token_id
        # Taken now, before training changes the weights: the starting model, and a separate reference if any.
        start = self.model.get_base_model() if self.lora else self.model
        self._fingerprint = model_fingerprint(start, f"device={self.device.type}:autocast={self.autocast_dtype}")
        if reference is not None:
            self._fingerprint = model_fingerprint(reference, "reference after", self._fingerprint)

    def get_flat(self) -> torch.Tensor:
        return parameters_to_vector(self.params).detach().clone()

    def set_flat(self, vector: torch.Tensor) -> None:
        with torch.no_grad():
            vector_to_parameters(vector.to(self.device, self.params[0].dtype), self.params)

    def flat_grad(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.params])

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logps(self.model, batch, self.autocast_dtype)

    @torch.no_grad()
    def reference_logps(self, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.reference_model is None:
            with self.model.disable_adapter():
                return pair_logps(self.model, batch, self.autocast_dtype)
        return pair_logps(self.reference_model, batch, self.autocast_dtype)

    def fingerprint(self) -> str:
        """Identifies the starting model and the reference: every weight and buffer's bytes, the model configs, and
        the compute kind.

        Reference log-probs cached under this key are valid exactly when all of these are the same.
        """
        return self._fingerprint


def model_fingerprint(model, *extra: str) -> str:
    """A hash of a transformers model's weights and buffers (LoRA adapters left out), its config and ``extra``."""
    h = hashlib.sha256()
    with torch.no_grad():
        for kind, named in (("param", model.named_parameters()), ("buffer", model.named_buffers())):
            for name, t in named:
                if "lora_" in name:
                    continue
                h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for text in extra:
        h.update(text.encode())
    return h.hexdigest()[:24]
