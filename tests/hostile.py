"""Small valid runs to mutate: the hostile-input tests of the readers, replay, calibrate and the fuzz test."""

from __future__ import annotations

import json
from pathlib import Path

START_EPOCH_S = 1767225600.0  # 2026-01-01T00:00:00Z
MONO0_S = 27500.0  # the engine clock has another origin than the wall clock (as in the measured runs)


def requests(n: int = 30, *, gap_s: float = 0.5, prompt: int = 100, output: int = 20) -> list[dict]:
    """``n`` well-formed requests: one every ``gap_s``, TTFT 50 ms, 20 ms per output token."""
    out = []
    for i in range(n):
        q = MONO0_S + i * gap_s
        first = q + 0.05
        out.append({"request_id": f"bench-{i}", "input_toks": prompt + i, "output_toks": output,
                    "arrival_time": START_EPOCH_S + 0.2 + i * gap_s, "queued_ts": q, "scheduled_ts": q + 0.001,
                    "first_token_ts": first, "last_token_ts": first + 0.02 * (output - 1)})
    return out


def meta(**over) -> dict:
    m = {"schema_version": 1, "model": "meta-llama/Llama-3.1-8B", "vllm_version": "0.19.0",
         "engine_kwargs": {"model": "meta-llama/Llama-3.1-8B", "max_num_seqs": 8, "max_num_batched_tokens": 512,
                           "max_model_len": 4096},
         "kv_cache": {"num_gpu_blocks": 1000, "block_size": 16},
         "hardware": {"device_name": "NVIDIA H100 80GB HBM3"},
         "started_at": "2026-01-01T00:00:00Z", "finished_at": "2026-01-01T00:00:20Z", "tick_seconds": 1.0}
    m.update(over)
    return m


def ticks(n: int = 16) -> list[str]:
    rows = ["t,prompt_throughput,gen_throughput,running,waiting,kv_cache_pct"]
    rows += [f"{float(t)},{200.0},{40.0},{2},{0},{1.5}" for t in range(1, n + 1)]
    return rows


def write(d: Path, reqs: list[dict] | None = None, meta_obj: dict | None = None,
          ts: list[str] | None = None) -> Path:
    """Write the three files as raw text (no validation: the point is to feed the reader bad input)."""
    d.mkdir(parents=True, exist_ok=True)
    reqs = requests() if reqs is None else reqs
    (d / "requests.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reqs), encoding="utf-8")
    (d / "meta.json").write_text(json.dumps(meta() if meta_obj is None else meta_obj, indent=2), encoding="utf-8")
    (d / "timeseries.csv").write_bytes(("\r\n".join(ticks() if ts is None else ts) + "\r\n").encode())
    return d
