"""Estimate a model's accelerator memory offline, from its `config.json` alone.

Role: the sizing half of automatic GPU placement (federation issue §5). The pilot sized GPUs by
trial and error, and nnsight's own `_remoteable_describe_checkpoint` asks the Hugging Face Hub;
this works from the architecture config, with no weights, no network and no model instance.

Flow: `load_config(source)` reads `config.json` (a local folder, our hand-written fixtures, or
the Hub cache, offline) -> `estimate(config, dtype)` counts the parameters exactly from the
architecture and adds the runtime margins -> `MemoryEstimate`, which `site_agent.placement`
packs onto devices.

The estimate for one device is the sum of four parts (all bytes, `b` = bytes per element of
the dtype, `T` = `batch_tokens`, `L` layers, `d` hidden size, `V` vocabulary):

- weights: parameters x b.
- KV cache: 2 (K and V) x L x kv_heads x head_dim x T x b.
- activations, for one forward pass whose hidden states a researcher saves:
  - saved hidden states: (L + 1) x T x d x b (the embeddings and every layer's output: the
    logit lens saves them all);
  - plus the largest transient of one layer: the attention scores H x T^2 x (b + 4) (eager
    attention keeps the scores in the model dtype and their float32 softmax; set
    `materialized_attention=False` for flash/memory-efficient SDPA kernels, which keep none), or
    the feed-forward intermediates T x width x b, whichever is larger. The width is per family:
    GPT-2 2 x I (c_fc output and its GELU), SwiGLU 3 x I (gate, up, product), Mixtral 4 x I + d
    (one expert, all tokens routed to it in the worst case), Llama 4 MoE E x (2d + 4I) + 3I
    (transformers runs every token through every expert as one dense bmm);
  - plus the logits T x V x 4 (float32: generation and the softmax upcast them).
  The T tokens are taken as one sequence: for a batch of shorter prompts the T^2 term is an
  upper bound.
- overhead: `CUDA_CONTEXT_BYTES` per device for the CUDA/ROCm context, the cuBLAS workspace and
  allocator slack.

Across n devices (`bytes_on(n)`), weights, KV cache and saved states are divided among them,
while each device needs its own context and room for the transient (layer scores/intermediates
and logits), since whichever device runs a layer allocates them whole.

Parameter counts are exact for GPT-2, Llama, Mistral, Qwen2, Qwen3, Mixtral and Llama 4 (text
model, MoE included; tests compare them with transformers models built on the meta device).
Any other decoder with Llama-style keys gets a Llama-shaped guess, labelled approximate.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edif.errors import ConfigError

GB = 10**9  # describe() uses decimal GB, as the study and weight-size tables do
GiB = 2**30

# A CUDA context on a recent NVIDIA GPU takes about 300-500 MiB before the first tensor (more
# with lazy module loading off), plus the cuBLAS workspace and caching-allocator slack; 0.5 GiB
# per device is the usual planning figure. ROCm contexts are of the same order.
CUDA_CONTEXT_BYTES = GiB // 2
DTYPE_BYTES: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}
LOGITS_BYTES = 4  # logits are upcast to float32 for sampling and the softmax
SCORE_SOFTMAX_BYTES = 4  # eager attention's softmax runs in float32

_SWIGLU = ("llama", "mistral", "qwen2", "qwen3")
_FAMILIES = ("gpt2", *_SWIGLU, "mixtral", "llama4")


@dataclass(frozen=True)
class MemoryEstimate:
    """What one model needs (all sizes in bytes) on one device; `bytes_on(n)` across n."""

    parameter_count: int
    weight_bytes: int
    kv_cache_bytes: int
    activation_bytes: int
    overhead_bytes: int  # per device the model occupies
    total_bytes: int  # on a single device: weights + KV cache + activations + overhead
    dtype: str = "float32"
    batch_tokens: int = 2048
    family: str = ""
    exact: bool = True  # False: the parameter count is a labelled approximation
    active_parameter_count: int = 0  # per token; equals parameter_count for dense models
    # The largest block accelerate never splits across devices (a decoder layer, or the
    # embedding): a model spanning devices can strand up to this much on each one.
    largest_module_bytes: int = 0

    # Part of activation_bytes: the largest short-lived allocation of a forward pass (one
    # layer's attention scores or feed-forward intermediates, and the logits). It is not
    # divided when a model spans devices: whichever device runs the layer needs it whole.
    transient_bytes: int = 0

    @property
    def runtime_bytes(self) -> int:
        """KV cache and activations: what a forward pass adds on top of the weights."""
        return self.kv_cache_bytes + self.activation_bytes

    def bytes_on(self, devices: int) -> int:
        """The total when the model spans `devices` devices: a context on each, and room for
        the transient on each; weights, KV cache and saved states are divided among them."""
        per_device = self.overhead_bytes + self.transient_bytes
        return self.weight_bytes + self.runtime_bytes - self.transient_bytes + devices * per_device

    def describe(self) -> str:
        count = _count_text(self.parameter_count)
        if not self.exact:
            count = f"~{count} (approximate: {self.family})"
        elif 0 < self.active_parameter_count != self.parameter_count:
            count = f"{count} ({_count_text(self.active_parameter_count)} active, {self.family})"
        else:
            count = f"{count} ({self.family})"
        return (
            f"{count} params in {self.dtype}: weights {_gb(self.weight_bytes)} + KV cache "
            f"{_gb(self.kv_cache_bytes)} + activations {_gb(self.activation_bytes)} "
            f"({self.batch_tokens} tokens) + overhead {_gb(self.overhead_bytes)} "
            f"= {_gb(self.total_bytes)}"
        )


@dataclass(frozen=True)
class _Architecture:
    """The figures of a config that the byte formulas need, after counting parameters."""

    family: str
    exact: bool
    parameters: int
    active_parameters: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    ffn_width: int  # elements per token of the largest feed-forward transient
    largest_module: int  # parameters of the largest decoder layer or embedding matrix


def estimate(
    config: Mapping[str, Any] | Any,
    dtype: str,
    *,
    batch_tokens: int = 2048,
    materialized_attention: bool = True,
    overhead_bytes: int = CUDA_CONTEXT_BYTES,
) -> MemoryEstimate:
    """The memory a model needs, from its config (a config.json dict or a PretrainedConfig).

    `dtype` is the site config's: float32, float16, bfloat16, or auto (the config's own
    `dtype`/`torch_dtype`, float32 when it names none, as transformers loads it).
    `batch_tokens` is the tokens of one forward pass (batch x sequence length) the margins
    are sized for.
    """
    if batch_tokens < 1:
        raise ConfigError(f"batch_tokens must be at least 1, got {batch_tokens}")
    text = _text_config(config)
    resolved = _resolve_dtype(dtype, text, config)
    b = DTYPE_BYTES[resolved]
    arch = _architecture(text)
    t = batch_tokens

    weights = arch.parameters * b
    kv_cache = 2 * arch.layers * arch.kv_heads * arch.head_dim * t * b
    saved = (arch.layers + 1) * t * arch.hidden * b
    attention = arch.heads * t * t * (b + SCORE_SOFTMAX_BYTES) if materialized_attention else 0
    feed_forward = t * arch.ffn_width * b
    logits = t * arch.vocab * LOGITS_BYTES
    transient = max(attention, feed_forward) + logits
    activations = saved + transient
    return MemoryEstimate(
        parameter_count=arch.parameters,
        weight_bytes=weights,
        kv_cache_bytes=kv_cache,
        activation_bytes=activations,
        overhead_bytes=overhead_bytes,
        total_bytes=weights + kv_cache + activations + overhead_bytes,
        dtype=resolved,
        batch_tokens=batch_tokens,
        family=arch.family,
        exact=arch.exact,
        active_parameter_count=arch.active_parameters,
        largest_module_bytes=arch.largest_module * b,
        transient_bytes=transient,
    )


def parameter_count(config: Mapping[str, Any] | Any) -> int:
    """Exact parameter count of the causal LM a config describes (approximate where labelled)."""
    return _architecture(_text_config(config)).parameters


def load_config(
    source: str | Path,
    *,
    revision: str | None = None,
    config_dirs: Sequence[str | Path] = (),
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Read a model's config.json offline.

    `source` is a local model folder (or a config.json path), or a Hub repo id. For a repo id,
    each of `config_dirs` is tried as `<dir>/<org>--<name>/config.json` (the hand-written
    fixtures in deploy/sites/configs/), then the Hugging Face cache (`cache_dir`, default
    HF_HUB_CACHE), never the network.
    """
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _read_json(path / "config.json")
    if path.is_file():
        return _read_json(path)
    if text.startswith(("/", ".", "~")) or text.count("/") != 1:
        raise ConfigError(f"model source {text!r} is not a folder with a config.json")
    for folder in config_dirs:
        candidate = Path(folder) / text.replace("/", "--") / "config.json"
        if candidate.is_file():
            return _read_json(candidate)
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(text, "config.json", cache_dir=cache_dir, revision=revision)
    except ValueError as exc:  # not a valid repo id
        raise ConfigError(
            f"model source {text!r} is neither a folder nor a repo id: {exc}"
        ) from exc
    if isinstance(cached, str):
        return _read_json(Path(cached))
    raise ConfigError(
        f"no config.json for {text!r}{f' at revision {revision}' if revision else ''}: it is "
        "not in the Hugging Face cache and the estimate works offline; download it once "
        f"(`hf download {text} config.json`) or point the model's `source` at a folder "
        "that holds it"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read model config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"model config {path} must be a JSON object")
    return data


def _text_config(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The causal LM's config as a dict, with transformers' defaults filled in.

    Defaults matter for exactness (GPT-2's n_inner, Qwen3's head_dim, Llama 4's moe_layers),
    so a known model_type goes through its transformers config class; that parses only, it
    builds no model. A multimodal config (Llama 4) yields its text config: a text-generation
    deployment loads the causal LM, not the vision tower.
    """
    if isinstance(config, Mapping):
        raw = dict(config)
        model_type = raw.get("model_type")
        if not isinstance(model_type, str) or not model_type:
            raise ConfigError("model config has no model_type; is this a transformers config?")
        from huggingface_hub.errors import StrictDataclassError
        from transformers import AutoConfig
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:  # not a transformers family: use the dict as is
            text = raw.get("text_config")
            return dict(text) if isinstance(text, Mapping) else raw
        rest = {k: v for k, v in raw.items() if k != "model_type"}
        try:
            config = AutoConfig.for_model(model_type, **rest)
        except (ValueError, TypeError, KeyError, StrictDataclassError) as exc:
            raise ConfigError(f"invalid {model_type} config: {exc}") from exc
    get_text = getattr(config, "get_text_config", None)
    if get_text is None:
        raise ConfigError(f"expected a config dict or a PretrainedConfig, got {type(config)!r}")
    return get_text().to_dict()


def _resolve_dtype(dtype: str, text: Mapping[str, Any], config: Any) -> str:
    if dtype == "auto":
        top = config if isinstance(config, Mapping) else {}
        named = text.get("dtype") or text.get("torch_dtype") or top.get("torch_dtype")
        dtype = str(named).removeprefix("torch.") if named else "float32"
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"dtype {dtype!r} has no size here; use one of {sorted(DTYPE_BYTES)}")
    return dtype


def _architecture(c: Mapping[str, Any]) -> _Architecture:
    family = str(c.get("model_type", ""))
    try:
        if family == "gpt2":
            return _gpt2(c)
        if family in _SWIGLU:
            return _swiglu(c, family, exact=True)
        if family == "mixtral":
            return _mixtral(c)
        if family in ("llama4", "llama4_text"):
            return _llama4(c)
        # An unknown decoder: count it as if Llama-shaped, and say so.
        return _swiglu(c, f"llama-shaped guess for model_type {family!r}", exact=False)
    except (KeyError, TypeError) as exc:
        raise ConfigError(
            f"cannot size model_type {family!r} from its config (missing or invalid {exc}); "
            f"exact families: {', '.join(_FAMILIES)}"
        ) from exc


def _gpt2(c: Mapping[str, Any]) -> _Architecture:
    d, n_layers, vocab = c["n_embd"], c["n_layer"], c["vocab_size"]
    inner = c.get("n_inner") or 4 * d
    per_layer = (
        2 * d  # ln_1
        + d * 3 * d + 3 * d  # attn.c_attn (q, k, v fused, with bias)
        + d * d + d  # attn.c_proj
        + 2 * d  # ln_2
        + d * inner + inner  # mlp.c_fc
        + inner * d + d  # mlp.c_proj
    )  # fmt: skip
    total = vocab * d + c["n_positions"] * d + n_layers * per_layer + 2 * d  # wte, wpe, ln_f
    if not c.get("tie_word_embeddings", True):
        total += vocab * d  # an untied lm_head (GPT-2 ties it to wte by default)
    heads = c["n_head"]
    return _Architecture(
        "gpt2", True, total, total, n_layers, d, heads, heads, d // heads, vocab, 2 * inner,
        max(per_layer, vocab * d),
    )  # fmt: skip


def _attention(c: Mapping[str, Any], d: int) -> tuple[int, int, int, int]:
    """Parameters of one Llama-style attention block, and (heads, kv_heads, head_dim)."""
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads  # grouped-query attention when fewer
    head_dim = c.get("head_dim") or d // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    params = d * q + 2 * d * kv + q * d  # q, k, v, o projections
    family = c.get("model_type")
    if family == "qwen2":
        params += q + 2 * kv  # Qwen2 always biases q, k and v
    elif c.get("attention_bias"):
        params += q + 2 * kv + d  # Llama's attention_bias biases o_proj too
    if family == "qwen3":
        params += 2 * head_dim  # q_norm and k_norm (RMSNorm over head_dim)
    return params, heads, kv_heads, head_dim


def _embeddings(c: Mapping[str, Any], d: int) -> int:
    """Input embedding, final norm, and the lm_head unless tied to the embedding."""
    vocab = c["vocab_size"]
    return vocab * d + d + (0 if c.get("tie_word_embeddings") else vocab * d)


def _swiglu(c: Mapping[str, Any], family: str, *, exact: bool) -> _Architecture:
    d, n_layers, inner = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    attention, heads, kv_heads, head_dim = _attention(c, d)
    mlp = 3 * d * inner + (2 * inner + d if c.get("mlp_bias") else 0)  # gate, up, down
    per_layer = attention + mlp + 2 * d  # + input and post-attention RMSNorms
    total = n_layers * per_layer + _embeddings(c, d)
    return _Architecture(
        family, exact, total, total, n_layers, d, heads, kv_heads, head_dim, c["vocab_size"],
        3 * inner, max(per_layer, c["vocab_size"] * d),
    )  # fmt: skip


def _mixtral(c: Mapping[str, Any]) -> _Architecture:
    d, n_layers, inner = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    experts, top_k = c["num_local_experts"], c["num_experts_per_tok"]
    attention, heads, kv_heads, head_dim = _attention(c, d)
    expert = 3 * d * inner  # gate_up_proj (2I x d) and down_proj (d x I)
    per_layer = attention + experts * expert + d * experts + 2 * d  # + router, 2 norms
    total = n_layers * per_layer + _embeddings(c, d)
    active = total - n_layers * (experts - top_k) * expert
    return _Architecture(
        "mixtral (MoE)", True, total, active, n_layers, d, heads, kv_heads, head_dim,
        c["vocab_size"], 4 * inner + d, max(per_layer, c["vocab_size"] * d),
    )  # fmt: skip


def _llama4(c: Mapping[str, Any]) -> _Architecture:
    """Llama 4 text model: MoE layers (routed experts + one shared expert) interleaved with
    dense SwiGLU layers of width intermediate_size_mlp."""
    d, n_layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    inner, inner_dense = c["intermediate_size"], c["intermediate_size_mlp"]
    experts, top_k = c["num_local_experts"], c["num_experts_per_tok"]
    moe_layers = c.get("moe_layers")
    if moe_layers is None:  # transformers' default: every step-th layer, the last of each step
        step = c.get("interleave_moe_layer_step", 1)
        moe_layers = range(step - 1, n_layers, step)
    n_moe = len({i for i in moe_layers if 0 <= i < n_layers})
    attention, heads, kv_heads, head_dim = _attention(c, d)  # qk-norm is an L2 norm: no weights
    expert = 3 * d * inner
    moe = experts * expert + d * experts + expert  # routed experts, router, shared expert
    dense = 3 * d * inner_dense
    total = n_layers * (attention + 2 * d) + n_moe * moe + (n_layers - n_moe) * dense
    total += _embeddings(c, d)
    active = total - n_moe * (experts - top_k) * expert
    ffn_width = max(experts * (2 * d + 4 * inner) + 3 * inner, 3 * inner_dense)
    largest = attention + 2 * d + max(moe if n_moe else 0, dense if n_moe < n_layers else 0)
    return _Architecture(
        "llama4 (MoE)" if n_moe else "llama4", True, total, active, n_layers, d, heads,
        kv_heads, head_dim, vocab, ffn_width, max(largest, vocab * d),
    )  # fmt: skip


def _count_text(n: int) -> str:
    for unit, size in (("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _gb(n: int) -> str:
    return f"{n / GB:.2f} GB"
