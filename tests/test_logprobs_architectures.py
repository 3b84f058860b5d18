"""`pair_logps` equals a plain ``model(input_ids).logits`` forward on every decoder-only architecture, whichever
way (packed, padded, one sequence at a time) it computes them."""

import inspect
import warnings

import pytest
import torch
import transformers

from distdpo.lm import logprobs
from distdpo.lm.logprobs import (
    LOOP,
    PACKED,
    PADDED,
    TokenizedPairs,
    backbone_and_head,
    logp_path,
    pack,
    pair_logps,
)

V = 128
LLAMA_LIKE = dict(
    vocab_size=V,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
MOE = dict(LLAMA_LIKE, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)

# name → (config class, model class, config kwargs, the path pair_logps takes). Logit post-processing attributes are
# set far from neutral so that skipping them fails the comparison; sliding windows are longer than the test rows.
ARCHS = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128),
        PACKED,
    ),
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE, PACKED),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_LIKE, sliding_window=64), PACKED),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2),
        PACKED,
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE, PACKED),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=32), PACKED),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE, head_dim=8), PACKED),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(MOE, head_dim=8), PACKED),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, head_dim=8), PACKED),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(LLAMA_LIKE, head_dim=8, sliding_window=64, final_logit_softcapping=1.5, attn_logit_softcapping=5.0),
        PACKED,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            LLAMA_LIKE,
            head_dim=8,
            sliding_window=64,
            final_logit_softcapping=1.5,
            layer_types=["sliding_attention", "full_attention"],
        ),
        PACKED,
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        dict(
            LLAMA_LIKE, logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.3
        ),
        PACKED,
    ),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2, logits_scaling=4.0),
        PACKED,
    ),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(LLAMA_LIKE, logit_scale=3.0), PACKED),
    "cohere2": ("Cohere2Config", "Cohere2ForCausalLM", dict(LLAMA_LIKE, logit_scale=3.0, sliding_window=64), PACKED),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(LLAMA_LIKE, partial_rotary_factor=0.5), PACKED),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(LLAMA_LIKE, pad_token_id=0), PACKED),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
        ),
        PACKED,
    ),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", dict(LLAMA_LIKE, pad_token_id=0), PACKED),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(LLAMA_LIKE, pad_token_id=0), PACKED),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA_LIKE, PACKED),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", dict(LLAMA_LIKE, sliding_window=64), PACKED),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", dict(LLAMA_LIKE, pad_token_id=0), PACKED),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        PACKED,
    ),
    "opt": (
        "OPTConfig",
        "OPTForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
        ),
        PACKED,
    ),
    "gptj": (
        "GPTJConfig",
        "GPTJForCausalLM",
        dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
        PACKED,
    ),
    "codegen": (
        "CodeGenConfig",
        "CodeGenForCausalLM",
        dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=128),
        PACKED,
    ),
    # ALiBi biases from the mask, not position_ids; GPT-Neo's local layers have their own window.
    "falcon-alibi": (
        "FalconConfig",
        "FalconForCausalLM",
        dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
        PADDED,
    ),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4), PADDED),
    "mpt": (
        "MptConfig",
        "MptForCausalLM",
        dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, max_seq_len=128),
        PADDED,
    ),
    "gpt_neo": (
        "GPTNeoConfig",
        "GPTNeoForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            max_position_embeddings=128,
            attention_types=[[["global", "local"], 1]],
            window_size=8,
        ),
        PADDED,
    ),
    # CPM-Ant's outputs change with right padding: one forward per sequence.
    "cpmant": (
        "CpmAntConfig",
        "CpmAntForCausalLM",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_attention_heads=4,
            dim_head=8,
            dim_ff=64,
            num_hidden_layers=2,
            prompt_length=4,
            position_bias_num_buckets=16,
            position_bias_max_distance=64,
        ),
        LOOP,
    ),
}


def randomize(model):
    """Weights large enough that logits span several nats and logit post-processing matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.eval()


def build(arch: str, **overrides):
    config_name, model_name, kwargs, _ = ARCHS[arch]
    config_cls = getattr(transformers, config_name, None)
    if config_cls is None:
        pytest.skip(f"{config_name} is not in transformers {transformers.__version__}")
    torch.manual_seed(0)
    return randomize(getattr(transformers, model_name)(config_cls(**{**kwargs, **overrides})))


def random_pairs(n: int = 4, seed: int = 0) -> TokenizedPairs:
    """Pairs of random lengths (prompts 1-8, completions 1-9 tokens), so every batch has padding."""
    g = torch.Generator().manual_seed(seed)
    draw = lambda lo, hi: torch.randint(1, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g)  # noqa: E731
    pairs = TokenizedPairs([], [], [])
    for _ in range(n):
        pairs.prompt.append(draw(1, 9))
        pairs.chosen.append(draw(1, 10))
        pairs.rejected.append(draw(1, 10))
    return pairs


@torch.no_grad()
def plain_logp(model, prompt: torch.Tensor, completion: torch.Tensor) -> float:
    """log π(completion|prompt) from one unpadded ``model(input_ids)`` forward."""
    ids = torch.cat([prompt, completion])[None]
    logps = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    return float(logps[len(prompt) - 1 : -1].gather(1, completion[:, None]).sum())


def assert_matches_plain(model, pairs: TokenizedPairs, reference=None):
    with torch.no_grad():
        w, l = pair_logps(model, pack(pairs, list(range(len(pairs))), pad_id=0))
    assert w.dtype == l.dtype == torch.float32
    reference = reference or model
    for i in range(len(pairs)):
        assert w[i].item() == pytest.approx(plain_logp(reference, pairs.prompt[i], pairs.chosen[i]), abs=1e-3)
        assert l[i].item() == pytest.approx(plain_logp(reference, pairs.prompt[i], pairs.rejected[i]), abs=1e-3)
    return w, l


@pytest.mark.parametrize("arch", list(ARCHS))
def test_pair_logps_equal_a_plain_forward(arch):
    model = build(arch)
    pairs = random_pairs()
    expected = ARCHS[arch][3]
    with warnings.catch_warnings():
        # Only a model whose outputs depend on padding warns (that it is slow); an allow-listed one never does.
        warnings.simplefilter("ignore" if expected == LOOP else "error", RuntimeWarning)
        assert logp_path(model, pack(pairs, [0, 1, 2, 3], pad_id=0)) == expected
    assert_matches_plain(model, pairs)


@pytest.mark.parametrize("arch", ["gemma2", "gemma3_text", "granite", "cohere"])
def test_logit_postprocessing_is_not_a_no_op_here(arch):
    """Head logits without the configured scale / cap give other log-probs, so the comparison above would catch a
    packed path that skipped them."""
    model = build(arch)
    pairs = random_pairs(2)
    body, head = backbone_and_head(model)
    ids = torch.cat([pairs.prompt[0], pairs.chosen[0]])[None]
    with torch.no_grad():
        raw = torch.log_softmax(head(body(input_ids=ids).last_hidden_state)[0].double(), dim=-1)
    raw_logp = float(raw[len(pairs.prompt[0]) - 1 : -1].gather(1, pairs.chosen[0][:, None]).sum())
    assert abs(raw_logp - plain_logp(model, pairs.prompt[0], pairs.chosen[0])) > 0.5


def test_sliding_window_shorter_than_the_packed_rows_pads():
    model = build("mistral", sliding_window=7)
    pairs = random_pairs()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the self-check fits its pair in the window: it passes
        assert logp_path(model, pack(pairs, [0, 1, 2, 3], pad_id=0)) == PADDED
        assert (
            logp_path(
                model, pack(TokenizedPairs([torch.tensor([5, 6])], [torch.tensor([7, 8])], [torch.tensor([9])]), [0], 0)
            )
            == PACKED
        )
    assert_matches_plain(model, pairs)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_path_is_used_for_gpt2_and_llama(arch, monkeypatch):
    model = build(arch)
    batch = pack(random_pairs(), [0, 1, 2, 3], pad_id=0)
    assert logp_path(model, batch) == PACKED  # runs the one-time self-check
    calls = []
    monkeypatch.setitem(logprobs._PATHS, PACKED, lambda *a: calls.append(1) or logprobs._packed_logps(*a))
    monkeypatch.setitem(logprobs._PATHS, PADDED, lambda *a: pytest.fail("padded forward"))
    w, l = pair_logps(model, batch)
    assert calls and torch.isfinite(w).all() and torch.isfinite(l).all()


def test_a_failed_self_check_falls_back(monkeypatch):
    model = build("llama")
    packed = logprobs._packed_logps
    monkeypatch.setitem(logprobs._PATHS, PACKED, lambda m, b, d: tuple(x + 1.0 for x in packed(m, b, d)))
    with pytest.warns(RuntimeWarning, match="packed log-probs of model_type 'llama' disagree"):
        assert logp_path(model, pack(random_pairs(), [0, 1], pad_id=0)) == PADDED
    assert_matches_plain(model, random_pairs())


@pytest.mark.parametrize("arch, targets", [("granite", ["q_proj", "v_proj"]), ("bloom", ["query_key_value"])])
def test_lora_policy_and_disabled_adapter_reference(arch, targets):
    peft = pytest.importorskip("peft")
    reference = build(arch)  # the same weights, never wrapped
    model = peft.get_peft_model(build(arch), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # B = 0 at init would make the adapter a no-op
    model.eval()
    pairs = random_pairs()
    assert logp_path(model, pack(pairs, [0, 1, 2, 3], pad_id=0)) == ARCHS[arch][3]
    policy_w, _ = assert_matches_plain(model, pairs)
    with model.disable_adapter():
        ref_w, _ = assert_matches_plain(model, pairs, reference=reference)
    assert (policy_w - ref_w).abs().max() > 0.05
    w, l = pair_logps(model, pack(pairs, [0, 1, 2, 3], pad_id=0))
    (w - l).sum().backward()  # gradients reach the adapter through whichever path is taken
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_" in n)


# ---- every other causal LM of the installed transformers, from a generically shrunk default config ----------------

NOT_DECODER_ONLY = {
    "bart",
    "bert",
    "bert-generation",
    "big_bird",
    "bigbird_pegasus",
    "blenderbot",
    "blenderbot-small",
    "camembert",
    "data2vec-text",
    "electra",
    "ernie",
    "marian",
    "mbart",
    "megatron-bert",
    "mvp",
    "pegasus",
    "plbart",
    "prophetnet",
    "rembert",
    "roberta",
    "roberta-prelayernorm",
    "roc_bert",
    "roformer",
    "trocr",
    "whisper",
    "xlm",
    "xlm-roberta",
    "xlm-roberta-xl",
    "xlnet",
    "xmod",
    "reformer",
}
SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    intermediate_size=64,
    head_dim=8,
    max_position_embeddings=128,
    n_positions=128,
    moe_intermediate_size=16,
    num_experts=4,
    n_routed_experts=4,
    num_local_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    shared_expert_intermediate_size=32,
    kv_lora_rank=8,
    q_lora_rank=8,
    qk_rope_head_dim=4,
    qk_nope_head_dim=4,
    v_head_dim=8,
    d_model=32,
    n_layers=2,
    n_heads=4,
    n_layer=2,
    n_head=4,
    n_embd=32,
    ffn_dim=64,
    num_layers=2,
    num_heads=4,
    n_input_layers=1,
    n_output_layers=1,
)


def other_model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    covered = {getattr(transformers, cfg).model_type for cfg, *_ in ARCHS.values() if hasattr(transformers, cfg)}
    return sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - NOT_DECODER_ONLY - covered)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", other_model_types())
def test_every_other_causal_lm_equals_a_plain_forward(model_type):
    """Skipped where the shrunk default config does not build a small model that runs a plain forward."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_cls = getattr(transformers, CONFIG_MAPPING_NAMES[model_type])
    known = set(inspect.signature(config_cls.__init__).parameters) | set(getattr(config_cls, "attribute_map", {}))
    known |= set(getattr(config_cls, "__dataclass_fields__", {}))
    pairs = random_pairs()
    try:
        config = config_cls(**{k: v for k, v in SMALL.items() if k in known})
        model_cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
        with torch.device("meta"):
            size = sum(p.numel() for p in model_cls(config).parameters())
        if size > 3_000_000:
            pytest.skip(f"the default config shrinks to {size} parameters only")
        torch.manual_seed(0)
        model = randomize(model_cls(config))
        plain_logp(model, pairs.prompt[0], pairs.chosen[0])
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no tiny model from the default config: {type(e).__name__}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a model falling back to one forward per sequence
        assert_matches_plain(model, pairs)
