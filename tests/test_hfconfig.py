"""config.json -> ModelSpec (sim.modelshape via traces.hfconfig) for each supported family, on tiny configs whose
parameter counts are worked out by hand below, and the shape-resolution order: --model-config, the served
directory, the local Hugging Face cache (a real directory tree in HF's layout), the catalogue, unknown."""

import json

import pytest

from sim import catalog
from traces.errors import TraceFormatError
from traces.hfconfig import (
    find_in_hf_cache,
    hf_hub_dir,
    model_entry_from_file,
    resolve_shape,
    unknown_shape_message,
)

# h=8, 2 layers, 2 Q heads / 1 KV head x 4, MLP 16, vocab 10. Per layer: attention q 64 + k 32 + v 32 + o 64 = 192,
# MLP 3*8*16 = 384, two norms 16. Outside the layers: embedding 80, final norm 8, LM head 80 (untied).
TINY = {"hidden_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "intermediate_size": 16, "vocab_size": 10, "max_position_embeddings": 64, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def _write(tmp_path, config, name="config.json"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))
    return path


def _entry(tmp_path, config):
    return model_entry_from_file(_write(tmp_path, config), name="t/tiny")


@pytest.mark.parametrize("family,extra,total,emb", [
    ("llama", {"architectures": ["LlamaForCausalLM"]}, 2 * 592 + 168, 80),
    ("llama", {"tie_word_embeddings": True}, 2 * 592 + 88, 0),           # tied: no LM head, no matmul-free table
    ("mistral", {"architectures": ["MistralForCausalLM"], "sliding_window": None}, 2 * 592 + 168, 80),
    ("qwen2", {"architectures": ["Qwen2ForCausalLM"]}, 2 * (592 + 16) + 168, 80),  # Q/K/V biases (2+2*1)*4
    ("qwen3", {"head_dim": 4}, 2 * (592 + 8) + 168, 80),                 # Q/K norms 2*4
])
def test_dense_families(tmp_path, family, extra, total, emb):
    e = _entry(tmp_path, {**TINY, "model_type": family, **extra})
    assert e.spec.num_params == total and e.spec.embedding_params == emb and not e.spec.is_moe
    assert e.spec.kv_bytes_per_token == 2 * 2 * 1 * 4 * 2 and e.spec.head_dim == 4
    assert e.max_position_embeddings == 64 and e.vocab_size == 10 and e.intermediate_size == 16
    assert e.architecture == family and str(tmp_path) in e.sources["model"]


def test_qwen2_moe_with_shared_expert(tmp_path):
    # per layer: attention 192 + biases 16, norms 16, router 8*4, shared expert 3*8*10 + its gate 8,
    # experts 4 x 3*8*6 (active: 2 of them)
    e = _entry(tmp_path, {**TINY, "model_type": "qwen2_moe", "num_experts": 4, "num_experts_per_tok": 2,
                          "moe_intermediate_size": 6, "shared_expert_intermediate_size": 10, "decoder_sparse_step": 1})
    per_layer = 208 + 16 + 32 + 248
    assert e.spec.num_params == 2 * (per_layer + 576) + 168
    assert e.spec.active_params == 2 * (per_layer + 288) + 168
    assert (e.spec.num_experts, e.spec.num_experts_per_tok, e.spec.num_shared_experts) == (4, 2, 1)
    assert e.intermediate_size == 2 * 6 + 10


def test_qwen3_moe_sparse_step_and_mlp_only_layers(tmp_path):
    cfg = {**TINY, "model_type": "qwen3_moe", "head_dim": 4, "num_experts": 4, "num_experts_per_tok": 2,
           "moe_intermediate_size": 6, "decoder_sparse_step": 1, "mlp_only_layers": [0]}
    e = _entry(tmp_path, cfg)
    dense, moe = 200 + 16 + 384, 200 + 16 + 32 + 576  # layer 0 dense, layer 1 MoE (no shared expert)
    assert e.spec.num_params == dense + moe + 168 and e.spec.num_shared_experts == 0


def test_mixtral(tmp_path):
    e = _entry(tmp_path, {**TINY, "model_type": "mixtral", "intermediate_size": 6, "num_local_experts": 4,
                          "num_experts_per_tok": 2})
    assert e.spec.num_params == 2 * (192 + 16 + 32 + 4 * 144) + 168
    assert e.spec.active_params == 2 * (192 + 16 + 32 + 2 * 144) + 168


def test_gpt_oss(tmp_path):
    # attention 192 + Q/K/V biases 16 + O bias 8 + sinks 2; router 8*4 + bias 4; an expert: gate_up 8*2*6 + 12,
    # down 6*8 + 8 = 164
    e = _entry(tmp_path, {**TINY, "model_type": "gpt_oss", "head_dim": 4, "intermediate_size": 6,
                          "num_local_experts": 4, "experts_per_token": 2, "attention_bias": True,
                          "sliding_window": 3, "layer_types": ["sliding_attention", "full_attention"]})
    assert e.spec.num_params == 2 * (218 + 16 + 36 + 4 * 164) + 168
    assert e.spec.active_params == 2 * (218 + 16 + 36 + 2 * 164) + 168
    assert (e.sliding_window, e.num_sliding_layers) == (3, 1)


@pytest.mark.parametrize("family,q_lora,attn,router_bias", [("deepseek_v2", None, 180, 0), ("deepseek_v3", 3, 177, 4)])
def test_deepseek_mla(tmp_path, family, q_lora, attn, router_bias):
    # MLA: q 8*2*(2+1) (or LoRA 8*3 + norm 3 + 3*2*3), kv_a 8*(4+1), norm 4, kv_b 4*2*(2+3), o 2*3*8
    cfg = {**TINY, "model_type": family, "q_lora_rank": q_lora, "kv_lora_rank": 4, "qk_nope_head_dim": 2,
           "qk_rope_head_dim": 1, "v_head_dim": 3, "n_routed_experts": 4, "n_shared_experts": 1,
           "num_experts_per_tok": 2, "moe_intermediate_size": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1}
    e = _entry(tmp_path, cfg)
    dense = attn + 16 + 384
    moe_base = attn + 16 + 32 + router_bias + 144  # router, one shared expert 3*8*6
    assert e.spec.num_params == dense + moe_base + 4 * 144 + 168
    assert e.spec.active_params == dense + moe_base + 2 * 144 + 168
    assert e.spec.kv_latent_dim == 5 and e.spec.kv_bytes_per_token == 2 * 5 * 2  # layers x latent x bf16
    assert e.spec.head_dim == 3 and e.spec.num_kv_heads == 2


def test_gemma2_and_multimodal_gemma3(tmp_path):
    g2 = _entry(tmp_path, {**TINY, "model_type": "gemma2", "head_dim": 4, "sliding_window": 4})
    assert g2.spec.num_params == 2 * (192 + 384 + 32) + 88 and g2.spec.embedding_params == 0  # 4 norms, tied
    assert (g2.sliding_window, g2.num_sliding_layers) == (4, 1)
    text = {k: v for k, v in TINY.items() if k != "torch_dtype"}
    mm = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "torch_dtype": "bfloat16",
          "text_config": {**text, "model_type": "gemma3_text", "head_dim": 4, "sliding_window": 4},
          "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 1152, "num_hidden_layers": 27}}
    g3 = model_entry_from_file(_write(tmp_path / "g3", mm), name="t/g3")
    assert g3.spec.num_params == 2 * (200 + 384 + 32) + 88  # Q/K norms; the vision tower is not counted
    assert g3.num_sliding_layers == 2  # pattern 6: layers 0..4 of every 6 slide


def test_minimal_gemma3_text_config_takes_the_family_defaults(tmp_path):
    """Gemma 3's multimodal config.json writes a minimal text_config (no vocab_size, max_position_embeddings);
    transformers fills Gemma3TextConfig's defaults, and so do we: the 27B's text part from the catalogue."""
    minimal = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
               "text_config": {"model_type": "gemma3_text", "hidden_size": 5376, "intermediate_size": 21504,
                               "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16,
                               "head_dim": 128, "sliding_window": 1024, "query_pre_attn_scalar": 168},
               "vision_config": {"model_type": "siglip_vision_model"}}
    e = model_entry_from_file(_write(tmp_path, minimal), name="google/gemma-3-27b-it")
    cat = catalog.lookup_model("google/gemma-3-27b-it")
    assert e.spec == cat.spec and e.vocab_size == 262208 and e.max_position_embeddings == 131072
    assert (e.sliding_window, e.num_sliding_layers) == (cat.sliding_window, cat.num_sliding_layers)


def test_float32_config_streams_four_bytes_per_weight(tmp_path):
    e = _entry(tmp_path, {**TINY, "model_type": "llama", "torch_dtype": "float32"})
    assert e.spec.dtype_bytes == 4 and e.spec.weight_bytes == 4 * e.spec.num_params


def test_catalogue_excerpts_read_back_through_hfconfig(tmp_path):
    raw = json.loads((catalog.resources.files("sim") / "data" / "models.json").read_text())
    for m in raw["models"]:
        e = model_entry_from_file(_write(tmp_path / m["id"].replace("/", "_"), m["config"]), name=m["id"])
        cat = catalog.models()[m["id"]].spec
        assert e.spec.num_params == pytest.approx(cat.num_params, rel=0.01), m["id"]
        assert (e.spec.num_layers, e.spec.num_kv_heads, e.spec.kv_bytes_per_token, e.spec.active_params) == (
            cat.num_layers, cat.num_kv_heads, cat.kv_bytes_per_token, cat.active_params), m["id"]


def test_bad_configs_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"model_type 'mamba'.*supported"):
        _entry(tmp_path, {"model_type": "mamba", "architectures": ["MambaForCausalLM"], "hidden_size": 8})
    with pytest.raises(ValueError, match=r"config.json.*no 'num_hidden_layers'"):
        _entry(tmp_path, {k: v for k, v in {**TINY, "model_type": "llama"}.items() if k != "num_hidden_layers"})
    bad = tmp_path / "broken" / "config.json"
    bad.parent.mkdir()
    bad.write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}')
    with pytest.raises(TraceFormatError, match=r"broken/config.json:3"):
        model_entry_from_file(bad.parent)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        model_entry_from_file(tmp_path / "nowhere")


def _hub_model(hub, model_id, config, snapshot="0123abcd"):
    repo = hub / ("models--" + model_id.replace("/", "--"))
    _write(repo / "snapshots" / snapshot, config)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(snapshot)
    return repo


def test_resolution_order(tmp_path):
    hub = tmp_path / "hf" / "hub"
    moe = {**TINY, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "intermediate_size": 6,
           "num_local_experts": 4, "num_experts_per_tok": 2}
    _hub_model(hub, "acme/tiny-moe", moe)
    _hub_model(hub, "acme/old", {**TINY, "model_type": "llama"}, snapshot="aaaa")
    _write(hub / "models--acme--old" / "snapshots" / "bbbb", {**TINY, "model_type": "llama", "num_hidden_layers": 3})
    (hub / "models--acme--old" / "refs" / "main").write_text("bbbb")
    env = {"HF_HOME": str(tmp_path / "hf")}
    assert hf_hub_dir(env) == hub and hf_hub_dir({"HF_HUB_CACHE": str(hub), "HF_HOME": "/x"}) == hub
    assert find_in_hf_cache("acme/old", hub).parent.name == "bbbb"  # the snapshot refs/main names
    # the cache
    r = resolve_shape(["acme/tiny-moe"], env=env)
    assert r.kind == "hf_cache" and r.entry.spec.name == "acme/tiny-moe" and r.entry.spec.num_experts == 4
    assert "Hugging Face cache" in r.source
    # --model-config wins over the cache and the catalogue
    own = _write(tmp_path / "mine", {**TINY, "model_type": "llama"})
    r = resolve_shape(["acme/tiny-moe"], model_config=own.parent, env=env)
    assert r.kind == "model_config" and not r.entry.spec.is_moe and "--model-config" in r.source
    # a served local directory (vLLM serves directories; meta.model is then the path)
    r = resolve_shape([str(own.parent)], env=env)
    assert r.kind == "local_dir" and r.entry.spec.num_params == 2 * 592 + 168
    # the catalogue, when neither a file nor the cache knows it
    r = resolve_shape(["tiny", "Qwen/Qwen3-30B-A3B"], env=env)
    assert r.kind == "catalogue" and r.entry is catalog.models()["Qwen/Qwen3-30B-A3B"]
    # a variant by name (a served directory that is not here, a fine-tune): the catalogue, and it says so
    r = resolve_shape(["/nonexistent/models/Qwen3-30B-A3B-Instruct-2507"], env=env)
    assert r.kind == "catalogue" and "variant" in r.source and "--model-config" in r.source
    # unknown
    assert resolve_shape(["acme/unknown"], env=env) is None
    assert "--model-config" in unknown_shape_message(["acme/unknown"], env)


def test_cached_config_of_unsupported_family_is_skipped_and_reported(tmp_path):
    hub = tmp_path / "hub"
    _hub_model(hub, "acme/ssm", {"model_type": "mamba", "hidden_size": 8})
    env = {"HF_HUB_CACHE": str(hub)}
    assert resolve_shape(["acme/ssm"], env=env) is None
    msg = unknown_shape_message(["acme/ssm"], env)
    assert "'mamba'" in msg and "--model-config" in msg
    with pytest.raises(ValueError, match="mamba"):  # given explicitly, the same config is an error
        resolve_shape(["acme/ssm"], model_config=next(hub.rglob("config.json")), env=env)
