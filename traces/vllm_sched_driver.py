"""Drive vLLM's own v1 ``Scheduler`` step by step, with no model, over a batch of conformance cases.

Runs INSIDE a vLLM virtual environment (``traces.vllm_cpu.ensure_venv()``'s python, optionally with an older
release's pure-Python package first on ``PYTHONPATH``), as vLLM's unit tests do
(``tests/v1/core/utils.py`` ``create_scheduler`` / ``create_requests``): ``schedule()``, then
``update_from_output(...)`` with one sampled token for every request whose prompt (plus outputs so far) is
complete after the step. It imports nothing of ours, and vLLM only inside functions, so importing this module
from the project's own environment never fails.

Usage: ``python vllm_sched_driver.py CASES.json RECORDS.json`` (one batch), or ``python vllm_sched_driver.py
--serve`` (persistent: one batch per line of stdin, its answer as one line on stdout; vLLM's own prints go to
stderr; ends at end of input), which lets a property-based test send many small batches to one process and pay
vLLM's import once (``traces.conformance.SchedulerDriver``). The batch is
``{"model_dir": DIR, "cases": [case, ...]}``; a case is (``traces.conformance`` builds them)::

    {"id": str, "engine": {"block_size", "num_gpu_blocks", "max_num_seqs", "max_num_batched_tokens",
                           "max_model_len", "enable_prefix_caching", "long_prefill_token_threshold" (0 = off),
                           "scheduler_reserve_full_isl" (optional, default true)},
     "requests": [{"id", "arrival_step", "prompt": [token ids], "output": [token ids], "max_tokens"}],
     "aborts": [{"id", "step"}], "max_steps": int}

``output`` lists the tokens "sampled" at each output position (unique per request, so nobody else can hit a
request's output blocks). Arrivals and aborts of step s happen before step s's ``schedule()``. The answer is
``{"vllm_version": str, "results": [{"id", "steps": [record, ...], "error": str|None}]}``, one record per
step (``traces.conformance.FIELDS``): scheduled tokens per request, admitted requests with the
tokens their prefix-cache lookup hit, preempted and finished ids, used KV blocks (``num_gpu_blocks - 1 -
free``, the usage gauge's numerator) and queue lengths after the step.

Signatures differ between releases (0.19.0: ``Scheduler(..., block_size)``; 0.32.0 adds ``hash_block_size``;
``Request`` gained keyword arguments; ``num_cached_tokens`` left ``Request``). Only keyword arguments both
accept are passed, and the hit is measured as ``num_computed_tokens`` right after ``schedule()`` minus the
tokens scheduled, which every release since 0.9 gives (``Scheduler._update_after_schedule``).
"""

from __future__ import annotations

import json
import sys
import time


def _build_scheduler(eng: dict, model_dir: str):
    """A ``Scheduler`` with exactly the case's limits (checked after construction: a config that vLLM
    silently adjusts would make the comparison meaningless)."""
    import torch
    from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
    from vllm.v1.structured_output import StructuredOutputManager

    bs, nb = eng["block_size"], eng["num_gpu_blocks"]
    thr = eng["long_prefill_token_threshold"] or 0
    model_config = ModelConfig(model=model_dir, skip_tokenizer_init=True, max_model_len=eng["max_model_len"],
                               dtype="float32", seed=0)
    scheduler_config = SchedulerConfig(
        max_num_seqs=eng["max_num_seqs"], max_num_batched_tokens=eng["max_num_batched_tokens"],
        max_model_len=eng["max_model_len"], long_prefill_token_threshold=thr, enable_chunked_prefill=True,
        is_encoder_decoder=False, async_scheduling=False,
        scheduler_reserve_full_isl=eng.get("scheduler_reserve_full_isl", True))
    cache_config = CacheConfig(block_size=bs, enable_prefix_caching=eng["enable_prefix_caching"])
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                             cache_config=cache_config)
    kv_cache_config = KVCacheConfig(num_blocks=nb, kv_cache_tensors=[], kv_cache_groups=[
        KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=bs, num_kv_heads=1, head_size=1,
                                                      dtype=torch.float32))])
    cache_config.num_gpu_blocks = nb
    sched = Scheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config, block_size=bs,
                      structured_output_manager=StructuredOutputManager(vllm_config), log_stats=True)
    got = {"max_num_seqs": sched.max_num_running_reqs, "max_num_batched_tokens": sched.max_num_scheduled_tokens,
           "max_model_len": sched.max_model_len, "block_size": sched.block_size,
           "enable_prefix_caching": sched.kv_cache_manager.enable_caching,
           "long_prefill_token_threshold": sched.scheduler_config.long_prefill_token_threshold,
           "num_gpu_blocks": sched.kv_cache_manager.block_pool.num_gpu_blocks,
           "scheduler_reserve_full_isl": sched.scheduler_config.scheduler_reserve_full_isl}
    want = {**{k: eng.get(k, True) for k in got}, "long_prefill_token_threshold": thr}
    if got != want:
        raise RuntimeError(f"vLLM adjusted the engine limits: asked {want}, got {got}")
    return sched


def _make_requests(case: dict, block_size: int) -> dict:
    from vllm.sampling_params import SamplingParams
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
    from vllm.v1.request import Request

    init_none_hash(sha256)
    hasher = get_request_block_hasher(block_size, sha256)
    out = {}
    for i, r in enumerate(case["requests"]):
        out[r["id"]] = Request(r["id"], list(r["prompt"]), SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True),
                               None, arrival_time=float(i), block_hasher=hasher)
    return out


def run_case(case: dict, model_dir: str) -> list[dict]:
    """Every step's record of one case (see the module docstring)."""
    from vllm.v1.outputs import ModelRunnerOutput
    from vllm.v1.request import RequestStatus

    eng = case["engine"]
    sched = _build_scheduler(eng, model_dir)
    pool = sched.kv_cache_manager.block_pool
    usable = eng["num_gpu_blocks"] - 1
    reqs = _make_requests(case, eng["block_size"])
    outputs = {r["id"]: r["output"] for r in case["requests"]}
    arrivals: dict[int, list[str]] = {}
    for r in case["requests"]:
        arrivals.setdefault(r["arrival_step"], []).append(r["id"])
    aborts: dict[int, list[str]] = {}
    for a in case.get("aborts", ()):
        aborts.setdefault(a["step"], []).append(a["id"])
    last_event = max([*arrivals, *aborts, 0])
    steps: list[dict] = []
    for step in range(case["max_steps"]):
        if step > last_event and not sched.requests:
            break
        for rid in aborts.get(step, ()):
            if rid in sched.requests:
                sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED)
        for rid in arrivals.get(step, ()):
            sched.add_request(reqs[rid])
        running_before = {r.request_id for r in sched.running}
        out = sched.schedule()
        scheduled = dict(out.num_scheduled_tokens)
        admitted = {rid: reqs[rid].num_computed_tokens - n for rid, n in scheduled.items()
                    if rid not in running_before}
        ids = list(scheduled)
        sampled = []
        for rid in ids:
            r = reqs[rid]
            done = r.num_computed_tokens >= r.num_tokens  # the prompt (plus outputs) is complete: sample
            sampled.append([outputs[rid][r.num_output_tokens]] if done else [])
        sched.update_from_output(out, ModelRunnerOutput(req_ids=ids, req_id_to_index={rid: i for i, rid in enumerate(ids)},
                                                        sampled_token_ids=sampled))
        finished = sorted(rid for rid in ids if reqs[rid].is_finished())
        steps.append({"step": step, "scheduled": sorted(scheduled.items()), "admitted": sorted(admitted.items()),
                      "preempted": sorted(out.preempted_req_ids or ()), "finished": finished,
                      "used_blocks": usable - pool.get_num_free_blocks(),
                      "running": len(sched.running), "waiting": len(sched.waiting)})
    return steps


def run_batch(batch: dict) -> list[dict]:
    results = []
    for case in batch["cases"]:
        try:
            results.append({"id": case["id"], "steps": run_case(case, batch["model_dir"]), "error": None})
        except Exception as e:  # one broken case must not hide the others' results
            results.append({"id": case["id"], "steps": [], "error": f"{type(e).__name__}: {e}"})
    return results


def serve() -> int:
    """One batch per stdin line, one answer per stdout line; everything else written to fd 1 goes to stderr."""
    import os

    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    import vllm

    answers.write(json.dumps({"vllm_version": vllm.__version__, "ready": True}) + "\n")
    answers.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        t0 = time.monotonic()
        results = run_batch(json.loads(line))
        answers.write(json.dumps({"vllm_version": vllm.__version__, "results": results,
                                  "wall_s": time.monotonic() - t0}) + "\n")
        answers.flush()
    return 0


def main() -> int:
    t0 = time.monotonic()
    if sys.argv[1:] == ["--serve"]:
        return serve()
    if len(sys.argv) != 3:
        print("usage: python vllm_sched_driver.py CASES.json RECORDS.json | --serve", file=sys.stderr)
        return 2
    with open(sys.argv[1]) as fh:
        batch = json.load(fh)
    import vllm

    results = run_batch(batch)
    with open(sys.argv[2], "w") as fh:  # not stdout: vLLM's logger writes there
        json.dump({"vllm_version": vllm.__version__, "results": results, "wall_s": time.monotonic() - t0}, fh)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
