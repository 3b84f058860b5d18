"""Causal language models as DPO policies: built-in tiny models, tokenization, log-probs, LoRA."""
