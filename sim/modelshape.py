"""A model's shape from its Hugging Face ``config.json``: ``ModelSpec`` plus the sizes around it.

One rule for every source of shapes: the bundled catalogue (``sim/data/models.json`` holds config.json
excerpts) and a user's own ``config.json`` (``traces.hfconfig``) both go through ``model_entry_from_config``.
Parameter counts are *derived* from the shape, layer by layer, as the modelling code of each family
builds its weights (``transformers/models/<family>/modeling_<family>.py``, vLLM
``vllm/model_executor/models/<family>.py``):

* attention: Q/K/V/O projections (grouped-query), their biases where the family has them (Qwen2, gpt-oss),
  Q/K norms (Qwen3, Gemma 3), attention sinks (gpt-oss); or multi-head latent attention (DeepSeek-V2/V3:
  optional Q LoRA, the joint KV down-projection with the RoPE key, KV up-projection, O);
* MLP: gated (three matrices); MoE layers: the router, every routed expert, shared experts
  (DeepSeek ``n_shared_experts``, Qwen2-MoE ``shared_expert_intermediate_size`` and its gate);
* norms (two per layer, four for Gemma 2/3), the final norm, the embedding and an untied LM head.

Active parameters count ``num_experts_per_tok`` routed experts instead of all. Not counted: vision towers
of multimodal checkpoints (Gemma 3), DeepSeek-V3's multi-token-prediction layer (not used for serving
without speculative decoding), quantisation scales. Sliding-window layers are recorded
(``ModelEntry.sliding_window``, ``num_sliding_layers``) but the step-time model treats every layer as full
attention.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import ModelSpec

__all__ = ["FAMILIES", "FAMILY_DEFAULTS", "ModelEntry", "count_params", "model_entry_from_config", "text_config"]

#: model_type -> (attention kind, MoE layout, norms per layer, LM head tied by default, has QK norm)
FAMILIES: dict[str, tuple[str, str | None, int, bool, bool]] = {
    "llama": ("gqa", None, 2, False, False),
    "mistral": ("gqa", None, 2, False, False),
    "qwen2": ("gqa", None, 2, False, False),
    "qwen3": ("gqa", None, 2, False, True),
    "qwen2_moe": ("gqa", "qwen", 2, False, False),
    "qwen3_moe": ("gqa", "qwen", 2, False, True),
    "mixtral": ("gqa", "all", 2, False, False),
    "gpt_oss": ("gqa", "all", 2, False, False),
    "deepseek_v2": ("mla", "deepseek", 2, False, False),
    "deepseek_v3": ("mla", "deepseek", 2, False, False),
    "gemma": ("gqa", None, 2, True, False),
    "gemma2": ("gqa", None, 4, True, False),
    "gemma3": ("gqa", None, 4, True, True),
    "gemma3_text": ("gqa", None, 4, True, True),
}


#: keys a family's config.json may omit, with the defaults ``transformers`` fills in for them
#: (``GemmaConfig``, ``Gemma2Config``, ``Gemma3TextConfig`` in transformers/models/gemma*/configuration_*.py):
#: Gemma 3's multimodal checkpoints write a minimal ``text_config`` and rely on these
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": {"vocab_size": 256000, "max_position_embeddings": 8192, "head_dim": 256},
    "gemma2": {"vocab_size": 256000, "max_position_embeddings": 8192, "head_dim": 256, "sliding_window": 4096},
    "gemma3_text": {"vocab_size": 262208, "max_position_embeddings": 131072, "head_dim": 256,
                    "num_key_value_heads": 4, "sliding_window": 4096, "sliding_window_pattern": 6},
}
FAMILY_DEFAULTS["gemma3"] = FAMILY_DEFAULTS["gemma3_text"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEntry:
    """One model: its ``ModelSpec``, its default ``max_model_len``, the sizes that set activation memory,
    what is known of it from elsewhere, and where each number comes from.

    Attributes:
        intermediate_size: MLP width one token passes through (dense: ``intermediate_size``; MoE: its routed
            experts' widths plus the shared experts'), for the activation-memory estimate.
        published_params, published_active_params: the sizes the model card states (a check on the derived
            counts), ``None`` when not recorded.
        sources: ``"model"`` (the config), ``"max_position_embeddings"``, ``"published_params"``, ...
    """

    spec: ModelSpec
    max_position_embeddings: int
    vocab_size: int
    intermediate_size: int
    architecture: str = ""
    aliases: tuple[str, ...] = ()
    sliding_window: int | None = None
    num_sliding_layers: int = 0
    published_params: float | None = None
    published_active_params: float | None = None
    sources: dict[str, str] = field(default_factory=dict)


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a multimodal config (``text_config``), else the config itself, with the
    family's defaults (``FAMILY_DEFAULTS``) for keys it omits."""
    tc = config.get("text_config")
    if isinstance(tc, Mapping) and "num_hidden_layers" not in config:
        config = {"model_type": f"{config.get('model_type')}_text", **tc}
    defaults = FAMILY_DEFAULTS.get(str(config.get("model_type")))
    if defaults:
        config = {**defaults, **{k: v for k, v in config.items() if v is not None or k not in defaults}}
    return config


def _get(cfg: Mapping[str, Any], key: str, where: str, default: Any = ..., kind: type = int) -> Any:
    v = cfg.get(key, default)
    if v is ... or v is None and default is ...:
        raise ValueError(f"{where}: config has no {key!r} (needed for the model's shape)")
    if v is not None and kind is int and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
        raise ValueError(f"{where}: {key} must be a non-negative integer, got {v!r}")
    return v


@dataclass(frozen=True, slots=True)
class _Dims:
    family: str
    L: int
    h: int
    nq: int
    nkv: int
    hd: int
    V: int
    tied: bool


def _dims(cfg: Mapping[str, Any], where: str) -> _Dims:
    family = cfg.get("model_type")
    if family not in FAMILIES:
        arch = cfg.get("architectures")
        raise ValueError(f"{where}: model_type {family!r} (architectures {arch}) is not a supported family; "
                         f"supported: {sorted(FAMILIES)}. Pass --model-config with a config of one of these "
                         "families, or leave the shape unknown (calibration then needs the shape-free model)")
    h, nq = _get(cfg, "hidden_size", where), _get(cfg, "num_attention_heads", where)
    hd = cfg.get("head_dim") or (h // nq if nq else 0)
    nkv = cfg.get("num_key_value_heads") or nq
    tied = cfg.get("tie_word_embeddings", FAMILIES[family][3])
    return _Dims(family, _get(cfg, "num_hidden_layers", where), h, nq, nkv, hd, _get(cfg, "vocab_size", where),
                 bool(tied))


def _attention_params(cfg: Mapping[str, Any], d: _Dims, where: str) -> int:
    kind, _, _, _, qk_norm = FAMILIES[d.family]
    h, nq = d.h, d.nq
    if kind == "mla":
        ql, kvl = cfg.get("q_lora_rank"), _get(cfg, "kv_lora_rank", where)
        nope, rope = _get(cfg, "qk_nope_head_dim", where), _get(cfg, "qk_rope_head_dim", where)
        vhd = _get(cfg, "v_head_dim", where)
        q = h * nq * (nope + rope) if not ql else h * ql + ql + ql * nq * (nope + rope)
        return q + h * (kvl + rope) + kvl + kvl * nq * (nope + vhd) + nq * vhd * h
    qkv, o = h * (nq + 2 * d.nkv) * d.hd, nq * d.hd * h
    bias = 0
    if d.family == "qwen2" or d.family == "qwen2_moe" or cfg.get("attention_bias"):
        bias = (nq + 2 * d.nkv) * d.hd  # Q, K, V biases
        if cfg.get("attention_bias"):
            bias += h  # O bias (Llama's attention_bias, gpt-oss)
    sinks = nq if d.family == "gpt_oss" else 0
    return qkv + o + bias + sinks + (2 * d.hd if qk_norm else 0)


def _moe_layers(cfg: Mapping[str, Any], d: _Dims, where: str) -> list[bool]:
    """Which layers hold a MoE block."""
    layout = FAMILIES[d.family][1]
    if layout is None:
        return [False] * d.L
    if layout == "all":
        return [True] * d.L
    if layout == "deepseek":
        k, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1) or 1
        return [i >= k and i % freq == 0 for i in range(d.L)]
    step, only = cfg.get("decoder_sparse_step", 1) or 1, set(cfg.get("mlp_only_layers") or ())
    return [i not in only and (i + 1) % step == 0 for i in range(d.L)]


def _experts(cfg: Mapping[str, Any], d: _Dims, where: str) -> tuple[int, int, int, int, int]:
    """(routed experts E, per token k, shared experts, expert width, shared width) of a MoE family."""
    if d.family in ("mixtral", "gpt_oss"):
        E = _get(cfg, "num_local_experts", where)
        k = cfg.get("num_experts_per_tok") or _get(cfg, "experts_per_token", where)
        return E, k, 0, _get(cfg, "intermediate_size", where), 0
    if d.family.startswith("deepseek"):
        mi, ns = _get(cfg, "moe_intermediate_size", where), cfg.get("n_shared_experts") or 0
        return _get(cfg, "n_routed_experts", where), _get(cfg, "num_experts_per_tok", where), ns, mi, ns * mi
    shared_i = cfg.get("shared_expert_intermediate_size") or 0
    return (_get(cfg, "num_experts", where), _get(cfg, "num_experts_per_tok", where), 1 if shared_i else 0,
            _get(cfg, "moe_intermediate_size", where), shared_i)


def _expert_params(d: _Dims, width: int) -> int:
    if d.family == "gpt_oss":  # fused gate_up with bias, down with bias
        return d.h * 2 * width + 2 * width + width * d.h + d.h
    return 3 * d.h * width


def count_params(config: Mapping[str, Any], where: str = "config.json") -> dict[str, Any]:
    """Total, active and embedding parameters and the MoE layout derived from a config (see module doc)."""
    cfg = text_config(config)
    d = _dims(cfg, where)
    attn = _attention_params(cfg, d, where)
    norms = FAMILIES[d.family][2] * d.h
    moe = _moe_layers(cfg, d, where)
    E = k = ns = width = shared_w = 0
    if any(moe):
        E, k, ns, width, shared_w = _experts(cfg, d, where)
    dense_mlp = 3 * d.h * _get(cfg, "intermediate_size", where) if not all(moe) else 0
    router = d.h * E + (E if d.family in ("gpt_oss", "deepseek_v3") else 0)
    shared = 3 * d.h * shared_w + (d.h if d.family == "qwen2_moe" and shared_w else 0)
    total = active = 0
    for is_moe in moe:
        base = attn + norms + (router + shared if is_moe else dense_mlp)
        total += base + (E * _expert_params(d, width) if is_moe else 0)
        active += base + (k * _expert_params(d, width) if is_moe else 0)
    emb = d.V * d.h
    outer = emb + d.h + (0 if d.tied else emb)  # embedding, final norm, LM head
    return {"dims": d, "num_params": total + outer, "active_params": active + outer,
            "embedding_params": 0 if d.tied else emb, "num_experts": E, "num_experts_per_tok": k,
            "num_shared_experts": ns, "token_mlp_width": k * width + shared_w if any(moe) else
            _get(cfg, "intermediate_size", where)}


def _sliding(cfg: Mapping[str, Any], d: _Dims) -> tuple[int | None, int]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if isinstance(types, list) and types:
        n = sum(t == "sliding_attention" for t in types)
        return (window if n else None), n
    if not window:
        return None, 0
    if d.family == "gemma2":
        return window, (d.L + 1) // 2  # even layers slide
    if d.family in ("gemma3", "gemma3_text"):
        pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
        return window, sum((i + 1) % pattern != 0 for i in range(d.L))
    if d.family in ("mistral", "mixtral") and cfg.get("use_sliding_window", True):
        return window, d.L
    return None, 0


def model_entry_from_config(config: Mapping[str, Any], *, name: str, source: str, where: str = "config.json",
                            dtype_bytes: int = 2, **extra: Any) -> ModelEntry:
    """The ``ModelEntry`` of a Hugging Face ``config.json`` (a mapping); errors name ``where``.

    Args:
        name: the model id the spec carries.
        source: where the config came from (for ``sources["model"]``).
        extra: further ``ModelEntry`` fields (aliases, published sizes, more sources).
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"{where}: a config.json must be a JSON object")
    n = count_params(config, where)
    cfg, d = text_config(config), n["dims"]
    latent = None
    hd = d.hd
    if FAMILIES[d.family][0] == "mla":
        latent = cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]
        hd = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    moe = n["num_experts"] > 0
    spec = ModelSpec(name=name, num_layers=d.L, hidden_size=d.h, num_q_heads=d.nq,
                     num_kv_heads=d.nq if latent else d.nkv, head_dim=hd, num_params=float(n["num_params"]),
                     embedding_params=float(n["embedding_params"]), dtype_bytes=dtype_bytes,
                     active_params=float(n["active_params"]) if moe else None, num_experts=n["num_experts"],
                     num_experts_per_tok=n["num_experts_per_tok"], num_shared_experts=n["num_shared_experts"],
                     kv_latent_dim=latent)
    window, n_sliding = _sliding(cfg, d)
    sources = {"model": f"{source}; parameter counts DERIVED from the shape (sim.modelshape)",
               "max_position_embeddings": f"{source}: max_position_embeddings"}
    sources.update(extra.pop("sources", {}))
    return ModelEntry(spec=spec, max_position_embeddings=_get(cfg, "max_position_embeddings", where),
                      vocab_size=d.V, intermediate_size=int(n["token_mlp_width"]),
                      architecture=d.family, sliding_window=window, num_sliding_layers=n_sliding,
                      sources=sources, **extra)
