"""Memory estimates from config.json: exact parameter counts, byte formulas, offline loading.

Every parameter count is checked against `sum(p.numel())` of the transformers model built from
the same config on the meta device (shapes only: no memory, no weights). "Measured" footprints
come from the demo models loaded on CPU: their parameter bytes (exactly the estimate's
weights), parameter + buffer bytes (within 15%), the KV cache a forward pass really builds
(exactly the estimate's), and the hidden states + logits it returns (within the estimate's
activation margin).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

from edif.demo import TINY_GPT2, TINY_LLAMA, ensure_model
from edif.errors import ConfigError
from site_agent.memory import (
    CUDA_CONTEXT_BYTES,
    GB,
    MemoryEstimate,
    estimate,
    load_config,
    parameter_count,
)

CONFIGS = Path(__file__).resolve().parents[2] / "deploy" / "sites" / "configs"
GPT2 = "openai-community/gpt2"
LLAMA_8B = "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
LLAMA_70B = "deepseek-ai/DeepSeek-R1-Distill-Llama-70B"
MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E-Instruct"
REAL = (GPT2, LLAMA_8B, LLAMA_70B, MAVERICK)


def fixture_config(repo_id: str) -> dict:
    return load_config(repo_id, config_dirs=[CONFIGS])


def meta_count(config: dict) -> int:
    """Parameters of the causal LM transformers builds from `config`, on the meta device."""
    rest = {k: v for k, v in config.items() if k != "model_type"}
    cfg = AutoConfig.for_model(config["model_type"], **rest)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def demo_models(tmp_path_factory) -> dict[str, Path]:
    home = tmp_path_factory.mktemp("edif-home")
    return {repo_id: ensure_model(repo_id, home=home) for repo_id in (TINY_GPT2, TINY_LLAMA)}


# -- parameter counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("repo_id", REAL)
def test_real_configs_count_exactly_as_the_meta_model(repo_id):
    config = fixture_config(repo_id)
    assert parameter_count(config) == meta_count(config)


def test_published_sizes():
    assert parameter_count(fixture_config(GPT2)) == 124_439_808  # "124M"
    assert parameter_count(fixture_config(LLAMA_8B)) == 8_030_261_248  # "8.03B"
    assert parameter_count(fixture_config(LLAMA_70B)) == 70_553_706_496  # "70.6B"
    maverick = estimate(fixture_config(MAVERICK), "bfloat16")
    assert maverick.parameter_count == 400_711_848_960  # "~400B total"
    assert 17.0e9 < maverick.active_parameter_count < 17.3e9  # "17B active"
    assert maverick.exact and "MoE" in maverick.family


@pytest.mark.parametrize("repo_id", [TINY_GPT2, TINY_LLAMA])
def test_demo_models_count_exactly(demo_models, repo_id):
    config = json.loads((demo_models[repo_id] / "config.json").read_text())
    assert parameter_count(config) == meta_count(config)


SMALL = {
    "gpt2-inner-untied": dict(
        model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_inner=80, n_positions=16,
        vocab_size=50, tie_word_embeddings=False,
    ),
    "llama-biased-tied": dict(
        model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=50, attention_bias=True,
        mlp_bias=True, tie_word_embeddings=True,
    ),
    "llama-head-dim": dict(
        model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=50,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50, tie_word_embeddings=True,
    ),
    "qwen3-default-head-dim": dict(
        model_type="qwen3", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    ),
    "mixtral": dict(
        model_type="mixtral", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50, num_local_experts=4,
        num_experts_per_tok=2,
    ),
    "llama4-interleaved": dict(
        model_type="llama4_text", hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=50, num_local_experts=4, interleave_moe_layer_step=2,
    ),
    "llama4-moe-layers": dict(
        model_type="llama4_text", hidden_size=32, intermediate_size=16, intermediate_size_mlp=48,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        vocab_size=50, num_local_experts=3, moe_layers=[0], use_qk_norm=False,
    ),
    "llama4-multimodal": dict(
        model_type="llama4",
        text_config=dict(
            hidden_size=32, intermediate_size=16, intermediate_size_mlp=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=50,
            num_local_experts=2, interleave_moe_layer_step=1,
        ),
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SMALL))
def test_small_configs_of_every_family_count_exactly(name):
    assert parameter_count(SMALL[name]) == meta_count(SMALL[name])


def test_a_pretrained_config_object_counts_like_its_dict():
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=100,
    )  # fmt: skip
    with torch.device("meta"):
        expected = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    assert parameter_count(cfg) == expected == parameter_count(cfg.to_dict())


def test_moe_active_parameters_count_only_the_routed_experts():
    dense_equivalent = dict(SMALL["mixtral"], num_local_experts=2, num_experts_per_tok=2)
    mixtral = estimate(SMALL["mixtral"], "float32")
    # 4 experts, 2 per token: the active count is the model with only 2 experts (less router).
    assert mixtral.active_parameter_count == parameter_count(dense_equivalent) + 2 * 2 * 32


def test_an_unknown_family_gets_a_labelled_approximation():
    config = dict(
        model_type="somebody-elses-llama", hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, vocab_size=100,
    )  # fmt: skip
    est = estimate(config, "float32")
    llama_shaped = parameter_count(dict(config, model_type="llama"))
    assert not est.exact and est.parameter_count == llama_shaped
    assert "approximate" in est.describe() and "somebody-elses-llama" in est.describe()


@pytest.mark.parametrize(
    "config, match",
    [
        ({"hidden_size": 8}, "model_type"),
        ({"model_type": "made-up", "hidden_size": 8}, "cannot size"),
        ({"model_type": "llama", "hidden_size": "wide"}, "invalid llama config"),
    ],
)
def test_an_unusable_config_is_a_config_error(config, match):
    with pytest.raises(ConfigError, match=match):
        estimate(config, "float32")


# -- bytes ----------------------------------------------------------------------------------------


def test_the_8b_figures():
    est = estimate(fixture_config(LLAMA_8B), "bfloat16")
    assert est.weight_bytes == 8_030_261_248 * 2 and round(est.weight_bytes / GB, 2) == 16.06
    assert est.kv_cache_bytes == 2 * 32 * 8 * 128 * 2048 * 2
    saved = 33 * 2048 * 4096 * 2
    attention = 32 * 2048 * 2048 * (2 + 4)
    logits = 2048 * 128256 * 4
    assert est.activation_bytes == saved + attention + logits
    assert est.transient_bytes == attention + logits
    assert est.overhead_bytes == CUDA_CONTEXT_BYTES == 2**29
    assert est.total_bytes == (
        est.weight_bytes + est.kv_cache_bytes + est.activation_bytes + est.overhead_bytes
    )
    assert est.bytes_on(1) == est.total_bytes
    assert est.largest_module_bytes == 128256 * 4096 * 2  # the embedding outweighs a layer
    assert est.describe().startswith("8.03B (llama) params in bfloat16: weights 16.06 GB")


def test_flash_attention_drops_the_score_matrix():
    config = fixture_config(LLAMA_8B)
    eager = estimate(config, "bfloat16", batch_tokens=8192)
    sdpa = estimate(config, "bfloat16", batch_tokens=8192, materialized_attention=False)
    assert eager.activation_bytes - sdpa.activation_bytes == (
        32 * 8192**2 * 6 - 8192 * 3 * 14336 * 2  # scores out, SwiGLU intermediates in
    )


def test_dtype_auto_follows_the_config():
    assert estimate(fixture_config(LLAMA_8B), "auto").dtype == "bfloat16"
    assert estimate(fixture_config(MAVERICK), "auto").dtype == "bfloat16"
    assert estimate(fixture_config(GPT2), "auto").dtype == "float32"  # names none
    gpt2 = estimate(fixture_config(GPT2), "float16")
    assert gpt2.weight_bytes == 124_439_808 * 2


def test_bad_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="int8"):
        estimate(fixture_config(GPT2), "int8")
    with pytest.raises(ConfigError, match="batch_tokens"):
        estimate(fixture_config(GPT2), "float32", batch_tokens=0)


def test_estimates_for_the_study_models():
    e8 = estimate(fixture_config(LLAMA_8B), "bfloat16")
    e70 = estimate(fixture_config(LLAMA_70B), "bfloat16")
    mav = estimate(fixture_config(MAVERICK), "bfloat16")
    assert 18 * GB < e8.total_bytes < 20 * GB
    assert round(e70.weight_bytes / GB, 2) == 141.11 and e70.total_bytes < 150 * GB
    assert 801 * GB < mav.weight_bytes < 802 * GB
    # transformers runs every token through all 128 experts of an MoE layer (one dense bmm).
    assert mav.transient_bytes > 128 * 2048 * (2 * 5120 + 4 * 8192) * 2


# -- measured on the demo models ----------------------------------------------------------------


@pytest.mark.parametrize("repo_id", [TINY_GPT2, TINY_LLAMA])
def test_estimate_matches_the_loaded_demo_model(demo_models, repo_id):
    """Measured = the bytes the loaded model holds: parameters (== weight_bytes), parameters
    and buffers (within 15%), its real KV cache (== kv_cache_bytes), and the hidden states and
    logits of one forward pass (within activation_bytes)."""
    path = demo_models[repo_id]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokens = 32
    est = estimate(load_config(path), "float32", batch_tokens=tokens)

    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    assert est.weight_bytes == parameters
    assert abs(est.weight_bytes - (parameters + buffers)) <= 0.15 * (parameters + buffers)

    ids = torch.arange(tokens).unsqueeze(0) % model.config.vocab_size
    with torch.no_grad():
        out = model(ids, use_cache=True, output_hidden_states=True)
    cache = out.past_key_values
    kv = sum(
        t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
    )
    assert kv == est.kv_cache_bytes
    held = sum(h.numel() * h.element_size() for h in out.hidden_states)
    held += out.logits.numel() * out.logits.element_size()
    assert held <= est.activation_bytes


# -- loading configs offline --------------------------------------------------------------------


def test_load_config_from_a_folder_a_file_and_the_fixtures(demo_models, tmp_path):
    folder = demo_models[TINY_LLAMA]
    assert load_config(folder)["model_type"] == "llama"
    assert load_config(folder / "config.json") == load_config(str(folder))
    assert fixture_config(LLAMA_70B)["hidden_size"] == 8192


@pytest.mark.parametrize("repo_id", REAL)
def test_fixtures_say_they_were_written_by_hand(repo_id):
    assert "check before production" in fixture_config(repo_id)["_edif_note"]


def test_load_config_from_the_hugging_face_cache(tmp_path):
    repo = tmp_path / "models--org--cached-model"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(SMALL["mistral"]))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    assert load_config("org/cached-model", cache_dir=tmp_path) == SMALL["mistral"]


def test_a_missing_config_says_what_is_needed(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.json for 'org/absent'.*offline"):
        load_config("org/absent", cache_dir=tmp_path, config_dirs=[CONFIGS])
    with pytest.raises(ConfigError, match="not a folder"):
        load_config(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither a folder nor a repo id"):
        load_config("org/not a name")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(tmp_path)


def test_memory_estimate_is_a_plain_value():
    est = MemoryEstimate(1, 4, 0, 0, 0, 4)
    assert est.bytes_on(3) == 4 and est.runtime_bytes == 0
