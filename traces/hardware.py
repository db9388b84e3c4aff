"""Peak-rate constants of GPUs and shape constants of models, each with its source.

Calibration needs the roofline basis of ``sim.latency.PhysicsStepModel``: a GPU's dense BF16 peak and memory
bandwidth (``latency_physics.md`` s.1) and a model's shape (s.2). A run names its GPU in
``meta.hardware.device_name`` (when recorded) and its model in ``meta.model``; ``lookup_gpu`` and
``lookup_model`` find the entries. A new GPU or model is one more line in ``GPUS`` or ``MODELS``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sim import HardwareSpec, ModelSpec

__all__ = ["GPUS", "GpuEntry", "MODELS", "ModelEntry", "lookup_gpu", "lookup_model", "match_gpu_in_text"]

_S1 = "latency_physics.md s.1"


@dataclass(frozen=True, slots=True, kw_only=True)
class GpuEntry:
    """One GPU: its ``HardwareSpec`` plus the names it goes by and where each number comes from."""

    key: str
    aliases: tuple[str, ...]
    spec: HardwareSpec
    sources: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEntry:
    """One model: its ``ModelSpec``, its default ``max_model_len``, the sizes that set activation memory, sources."""

    spec: ModelSpec
    max_position_embeddings: int
    vocab_size: int
    intermediate_size: int
    aliases: tuple[str, ...] = ()
    sources: dict[str, str] = field(default_factory=dict)


def _gpu(key, aliases, name, peak, bw, mem, icx=None, **sources) -> GpuEntry:
    spec = HardwareSpec(name=name, peak_flops=peak, mem_bw_bytes_per_s=bw, memory_bytes=mem,
                        interconnect_bw_bytes_per_s=icx)
    return GpuEntry(key=key, aliases=aliases, spec=spec, sources=sources)


GPUS: dict[str, GpuEntry] = {e.key: e for e in (
    _gpu("rtx4090", ("rtx4090", "geforcertx4090", "4090"), "NVIDIA GeForce RTX 4090", 165e12, 1.008e12,
         25_250_627_584,
         peak_flops=f"165 TFLOP/s dense BF16 with FP32 accumulate, Ada whitepaper ({_S1})",
         mem_bw_bytes_per_s=f"1.008 TB/s GDDR6X, Ada whitepaper; LLMServingSim 4090 config mem_bw 1008 ({_S1})",
         memory_bytes="total memory torch reports for an RTX 4090 (meta.hardware.device_total_memory_bytes of "
                      "the rtx4090-llama-3.1-8b run)"),
    _gpu("rtxpro6000", ("rtxpro6000", "rtxpro6000blackwell", "pro6000"), "NVIDIA RTX PRO 6000 Blackwell",
         500e12, 1.792e12, 96 * 1024**3,
         peak_flops=f"~500 TFLOP/s dense BF16, DERIVED from 4,000 FP4 TOPS with sparsity / 8, not a datasheet "
                    f"line ({_S1})",
         mem_bw_bytes_per_s=f"1.792 TB/s GDDR7 512-bit, launch specs ({_S1})",
         memory_bytes="96 GB GDDR7 nominal, taken as 96 GiB (launch specs); what torch reports may be slightly "
                      "less"),
    _gpu("h100-sxm", ("h100sxm", "h100sxm580gb", "h10080gbhbm3", "h100"), "NVIDIA H100 SXM5 80GB", 989e12,
         3.35e12, 85_031_075_840, 450e9,
         peak_flops=f"989 TFLOP/s dense BF16, NVIDIA datasheet ({_S1})",
         mem_bw_bytes_per_s=f"3.35 TB/s HBM3, NVIDIA datasheet ({_S1})",
         memory_bytes="79.19 GiB that torch reports for an H100 SXM5 80GB",
         interconnect_bw_bytes_per_s="NVLink 4, 900 GB/s bidirectional = 450 GB/s per direction"),
    _gpu("h100-nvl", ("h100nvl",), "NVIDIA H100 NVL", 835e12, 3.9e12, 94e9, 300e9,
         peak_flops=f"835 TFLOP/s dense BF16 ({_S1})", mem_bw_bytes_per_s=f"3.9 TB/s ({_S1})",
         memory_bytes="94 GB nominal", interconnect_bw_bytes_per_s="NVLink bridge 600 GB/s bidirectional"),
    _gpu("h200", ("h200", "h200sxm"), "NVIDIA H200 SXM", 989e12, 4.8e12, 141e9, 450e9,
         peak_flops=f"989 TFLOP/s dense BF16 ({_S1})", mem_bw_bytes_per_s=f"4.8 TB/s HBM3e ({_S1})",
         memory_bytes="141 GB nominal", interconnect_bw_bytes_per_s="NVLink 4, 450 GB/s per direction"),
    _gpu("a100-80gb", ("a100", "a100sxm480gb", "a10080gb"), "NVIDIA A100 SXM 80GB", 312e12, 2.039e12, 80e9,
         300e9, peak_flops=f"312 TFLOP/s dense BF16 ({_S1})", mem_bw_bytes_per_s=f"2.039 TB/s HBM2e ({_S1})",
         memory_bytes="80 GB nominal", interconnect_bw_bytes_per_s="NVLink 3, 600 GB/s bidirectional"),
    _gpu("l40s", ("l40s",), "NVIDIA L40S", 362e12, 0.864e12, 48e9,
         peak_flops=f"362 TFLOP/s dense BF16, BLIS hardware_config.json ({_S1})",
         mem_bw_bytes_per_s=f"0.864 TB/s GDDR6 ({_S1})", memory_bytes="48 GB nominal"),
)}

_LLAMA_SRC = "config.json of the model (layers, hidden, heads, vocab); parameters and weights from latency_physics.md s.2"

MODELS: dict[str, ModelEntry] = {
    "meta-llama/Llama-3.1-8B": ModelEntry(
        spec=ModelSpec(name="meta-llama/Llama-3.1-8B", num_layers=32, hidden_size=4096, num_q_heads=32,
                       num_kv_heads=8, head_dim=128, num_params=8.03e9, embedding_params=128256 * 4096),
        max_position_embeddings=131072, vocab_size=128256, intermediate_size=14336,
        aliases=("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"),
        sources={"model": _LLAMA_SRC + "; embedding = vocab 128256 x hidden 4096",
                 "max_position_embeddings": "Llama-3.1 config.json max_position_embeddings 131072"}),
    "meta-llama/Llama-3.1-70B": ModelEntry(
        spec=ModelSpec(name="meta-llama/Llama-3.1-70B", num_layers=80, hidden_size=8192, num_q_heads=64,
                       num_kv_heads=8, head_dim=128, num_params=70.6e9, embedding_params=128256 * 8192),
        max_position_embeddings=131072, vocab_size=128256, intermediate_size=28672,
        aliases=("meta-llama/Llama-3.1-70B-Instruct",),
        sources={"model": _LLAMA_SRC + "; embedding = vocab 128256 x hidden 8192",
                 "max_position_embeddings": "Llama-3.1 config.json max_position_embeddings 131072"}),
    "Qwen/Qwen3-32B": ModelEntry(
        spec=ModelSpec(name="Qwen/Qwen3-32B", num_layers=64, hidden_size=5120, num_q_heads=64, num_kv_heads=8,
                       head_dim=128, num_params=32.8e9, embedding_params=151936 * 5120),
        max_position_embeddings=40960, vocab_size=151936, intermediate_size=25600,
        sources={"model": "Qwen3-32B config.json; parameters from latency_physics.md s.2; embedding = vocab "
                          "151936 x hidden 5120",
                 "max_position_embeddings": "Qwen3-32B config.json max_position_embeddings 40960"}),
}


def _norm(s: str) -> str:
    return re.sub(r"[^a-z0-9]", "", s.lower())


def match_gpu_in_text(text: str) -> GpuEntry | None:
    """The GPU whose longest alias appears in ``text`` (a device name or a run name), or ``None``."""
    t = _norm(text)
    best, best_len = None, 0
    for e in GPUS.values():
        for a in e.aliases:
            if a in t and len(a) > best_len:
                best, best_len = e, len(a)
    return best


def lookup_gpu(name: str) -> GpuEntry:
    """The table entry for a GPU key (``"rtx4090"``) or device name (``"NVIDIA GeForce RTX 4090"``)."""
    if name in GPUS:
        return GPUS[name]
    e = match_gpu_in_text(name)
    if e is None:
        raise ValueError(f"unknown GPU {name!r}; known: {sorted(GPUS)} (add a line to traces.hardware.GPUS "
                         "with its dense BF16 peak and memory bandwidth)")
    return e


def lookup_model(name: str) -> ModelEntry:
    """The table entry for a model name (Hugging Face id; case-insensitive; aliases accepted)."""
    low = name.lower()
    for key, e in MODELS.items():
        if low == key.lower() or low in (a.lower() for a in e.aliases):
            return e
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)} (add a line to traces.hardware.MODELS "
                     "with its layers, hidden size, heads and parameter count)")
