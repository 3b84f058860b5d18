"""A Hugging Face causal LM as a DPO policy whose trainable part is one flat vector.

With LoRA (``lora_r > 0``) the trainable part is the `peft` adapter and the
reference policy is the same model with the adapter disabled; with full
fine-tuning it is every weight and the reference is a frozen copy. Engines
only ever see the flat vector: that is what nodes hold, average and send.
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from pathlib import Path

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from distdpo.config import ConfigError
from distdpo.hub import check_hub_id, is_local
from distdpo.lm.builtin import BUILTIN, build_model, is_builtin, train_tokenizer
from distdpo.lm.logprobs import PackedBatch, pair_logps


def load_model_and_tokenizer(model: str, *, training_texts=None, vocab_size: int = 4096, seed: int = 0):
    """``builtin:<name>`` (random init + BPE trained on ``training_texts``), a local path, or a hub id."""
    if is_builtin(model):
        if model.removeprefix("builtin:") not in BUILTIN:
            raise ConfigError(
                f"policy.model = {model!r}: no such built-in model; expected one of "
                f"{', '.join('builtin:' + k for k in BUILTIN)}"
            )
        if training_texts is None:
            raise ValueError("a built-in model needs training texts for its tokenizer")
        tok = train_tokenizer(training_texts, vocab_size)
        return build_model(model, len(tok), seed), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(local_only: bool):
        tok = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
        return AutoModelForCausalLM.from_pretrained(name, local_files_only=local_only), tok

    name = str(Path(model).expanduser()) if is_local(model) else model
    try:
        lm, tok = load(True)  # a local directory, or a hub id already in the local cache
    except (OSError, ValueError) as e:
        if is_local(model):
            raise ConfigError(f"policy.model = {model!r}: cannot load a causal LM from that directory ({e})") from None
        check_hub_id("policy.model", model, "model")  # fails fast, naming why, when the hub cannot serve it
        try:
            lm, tok = load(False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load policy.model = {model!r} from the Hugging Face hub: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return lm, tok


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
    ):
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
            self.reference_model = None
        else:
            self.model = model
            self.reference_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.num_params = sum(p.numel() for p in self.params)
        self.pad_id = tokenizer.pad_token_id

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
        if self.lora:
            with self.model.disable_adapter():
                return pair_logps(self.model, batch, self.autocast_dtype)
        return pair_logps(self.reference_model, batch, self.autocast_dtype)

    def fingerprint(self) -> str:
        """Identifies the reference model: every weight and buffer's bytes, the model config, and the compute kind.

        Reference log-probs cached under this key are valid exactly when all of these are the same.
        """
        h = hashlib.sha256()
        ref = self.model.get_base_model() if self.lora else self.reference_model
        with torch.no_grad():
            for kind, named in (("param", ref.named_parameters()), ("buffer", ref.named_buffers())):
                for name, t in named:
                    if "lora_" in name:
                        continue
                    h.update(f"{kind}:{name}:{tuple(t.shape)}:{t.dtype}".encode())
                    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        h.update(ref.config.to_json_string(use_diff=False).encode())
        h.update(f"device={self.device.type}:autocast={self.autocast_dtype}".encode())
        return h.hexdigest()[:24]
