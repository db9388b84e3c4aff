"""The one catalogue of GPUs and models (sim.catalog): a source per number, shapes derived from config.json
excerpts that agree with the published sizes, device-name matching, and the pools that reference it."""

import json
from dataclasses import replace

import pytest

import sim
import traces.hardware as th
from envs.cmdp_catalog import ModelEntry as PoolEntry
from envs.cmdp_catalog import default_models
from sim import catalog
from sim.profiles import profile_path

REQUIRED_MODELS = [
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.2-1B",
    "meta-llama/Llama-3.2-3B", "Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B", "Qwen/Qwen3-8B",
    "Qwen/Qwen3-32B", "Qwen/Qwen3-30B-A3B", "Qwen/Qwen3-235B-A22B", "mistralai/Mistral-7B-v0.3",
    "mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x22B-v0.1", "deepseek-ai/DeepSeek-V2-Lite",
    "deepseek-ai/DeepSeek-V3", "openai/gpt-oss-20b", "openai/gpt-oss-120b", "google/gemma-2-9b",
    "google/gemma-2-27b", "google/gemma-3-27b-it",
]


def test_every_gpu_number_has_a_source():
    assert {"h100-sxm", "h200", "b200", "a10g", "l4", "a100-40gb", "h100-pcie", "mi300x", "rtx4090"} <= set(catalog.gpus())
    for key, e in catalog.gpus().items():
        for f in ("peak_flops", "mem_bw_bytes_per_s", "memory_bytes"):
            assert e.sources.get(f), (key, f)
        assert e.spec.interconnect in catalog.interconnects(), key  # every GPU has a link kind and default
        assert e.spec.interconnect_bw_bytes_per_s == catalog.interconnects()[e.spec.interconnect].bw_bytes_per_s
        assert e.sources.get("interconnect_bw_bytes_per_s"), key
    for key, link in catalog.interconnects().items():
        assert link.source and link.bw_bytes_per_s > 0, key
    # PCIe cards default to PCIe, SXM parts to NVLink
    assert catalog.gpus()["l4"].spec.interconnect == "pcie4x16"
    assert catalog.gpus()["h100-pcie"].spec.interconnect == "pcie5x16"
    assert catalog.gpus()["h100-sxm"].spec.interconnect == "nvlink4"


def test_every_model_has_sources_and_derived_sizes_match_the_published_ones():
    raw = json.loads((catalog.resources.files("sim") / "data" / "models.json").read_text())
    ids = [m["id"] for m in raw["models"]]
    assert set(REQUIRED_MODELS) <= set(ids) and len(ids) == len(set(ids))
    for m in raw["models"]:
        assert m["config_source"].startswith("https://huggingface.co/") and m["config_source"].endswith("config.json")
        assert m["published_source"] and m["published_params"] > 0
    from sim.modelshape import count_params
    for m in raw["models"]:
        e = catalog.models()[m["id"]]
        derived = count_params(m["config"])
        assert derived["num_params"] == pytest.approx(m["published_params"], rel=0.02), m["id"]
        assert e.sources["model"] and e.sources["max_position_embeddings"] and e.sources["published_params"]
        if m.get("published_active_params"):
            active = derived["active_params"] - (derived["embedding_params"]
                                                 if m.get("published_active_excludes_input_embedding") else 0)
            # published active sizes are rounded to two digits (2.4B, 3.3B): 3 %
            assert active == pytest.approx(m["published_active_params"], rel=0.03), m["id"]
            assert e.spec.is_moe and e.spec.active_params < e.spec.num_params
        else:
            assert not e.spec.is_moe
        if "num_params" in m:  # a pinned total says why
            assert e.spec.num_params == m["num_params"] and "published size" in e.sources["num_params"]


def test_moe_and_mla_shapes():
    q = catalog.lookup_model("Qwen/Qwen3-30B-A3B").spec
    assert (q.num_experts, q.num_experts_per_tok, q.num_shared_experts) == (128, 8, 0)
    ds = catalog.lookup_model("deepseek-ai/DeepSeek-V3").spec
    assert (ds.num_experts, ds.num_experts_per_tok, ds.num_shared_experts) == (256, 8, 1)
    assert ds.kv_latent_dim == 512 + 64 and ds.kv_bytes_per_token == 61 * 576 * 2  # MLA latent, not K and V heads
    g = catalog.lookup_model("openai/gpt-oss-20b")
    assert g.sliding_window == 128 and g.num_sliding_layers == 12
    gem = catalog.lookup_model("google/gemma-3-27b-it")
    assert gem.spec.head_dim == 128 and gem.sliding_window == 1024 and gem.num_sliding_layers == 62 - 62 // 6


def test_lookup_by_alias_and_unknown_names_say_what_to_pass():
    assert catalog.lookup_model("meta-llama/llama-3.1-8b-instruct").spec.name == "meta-llama/Llama-3.1-8B"
    assert catalog.find_model("acme/unknown") is None
    with pytest.raises(ValueError, match="--model-config"):
        catalog.lookup_model("acme/unknown")
    with pytest.raises(ValueError, match="--gpu-spec"):
        catalog.lookup_gpu("Voodoo 5")


@pytest.mark.parametrize("device,key", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H100 NVL", "h100-nvl"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"), ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb-pcie"), ("NVIDIA A10G", "a10g"), ("NVIDIA L4", "l4"),
    ("NVIDIA L40S", "l40s"), ("NVIDIA L40", "l40"), ("NVIDIA B200", "b200"), ("AMD Instinct MI300X", "mi300x"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("NVIDIA H200", "h200"), ("NVIDIA GH200 480GB", "gh200"),
    ("NVIDIA GH200 144G HBM3e", "gh200-144gb"), ("NVIDIA GH200 144GB HBM3e", "gh200-144gb"),
])
def test_device_names_find_their_gpu(device, key):
    assert catalog.match_gpu_in_text(device).key == key


def test_traces_hardware_is_the_catalogue():
    assert th.GPUS is catalog.gpus() and th.MODELS is catalog.models()
    assert th.lookup_model("Qwen/Qwen3-32B") is catalog.lookup_model("Qwen/Qwen3-32B")
    with pytest.raises(AttributeError):
        th.NO_SUCH_TABLE  # noqa: B018


def test_embedded_profiles_match_the_catalogue_and_write_what_they_wrote():
    for name in sim.list_profiles():
        prof = sim.load_profile(name)
        on_disk = json.loads(profile_path(name).read_text())
        d = prof.to_dict()
        assert (d["hardware"], d["model"], d["parallel"]) == (on_disk["hardware"], on_disk["model"],
                                                              on_disk["parallel"]), name
        assert prof.model == catalog.lookup_model(prof.model.name).spec, name


def test_pools_reference_catalogue_models():
    for m in default_models():
        prof = sim.load_profile(m.profile)
        assert m.catalogue_entry().spec.name == m.model_id
        m.check_profile(prof)
    bad = PoolEntry(name="llama-3.1-8b", profile="h100-llama-3.1-8b", price_usd_per_token=1e-7,
                    model_id="meta-llama/Llama-3.1-70B")
    with pytest.raises(ValueError, match="differs from the catalogue"):
        bad.check_profile(sim.load_profile("h100-llama-3.1-8b"))
    nowhere = PoolEntry(name="llama-3.1-8b", profile="h100-llama-3.1-8b", price_usd_per_token=1e-7,
                        model_id="acme/none")
    with pytest.raises(ValueError, match="not in the catalogue"):
        nowhere.catalogue_entry()
    # without a model_id the profile's model name is the catalogue id
    plain = replace(bad, model_id=None)
    plain.check_profile(sim.load_profile("h100-llama-3.1-8b"))


@pytest.mark.parametrize("name,base", [
    ("Qwen/Qwen3-30B-A3B-Instruct-2507", "Qwen/Qwen3-30B-A3B"), ("/models/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B"),
    ("unsloth/Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B"), ("RedHatAI/Meta-Llama-3.1-70B-Instruct-FP8", "meta-llama/Llama-3.1-70B"),
    ("Qwen/Qwen2.5-7B-Instruct-AWQ", "Qwen/Qwen2.5-7B"), ("google/gemma-3-27b", "google/gemma-3-27b-it"),
])
def test_variants_are_matched_by_name(name, base):
    entry, how = catalog.find_model_variant(name)
    assert entry.spec.name == base and "variant" in how


@pytest.mark.parametrize("name", ["acme/foo", "tiny", "Qwen/Qwen3", "meta-llama/Llama-3.1-8", "/models/my-model"])
def test_non_variants_are_not_matched(name):
    assert catalog.find_model_variant(name) is None
