"""``sim.EngineCore`` driven step by step over a conformance case (``traces.conformance``), in any mode.

Only the engine's public face is read: requests' ``status`` and ``num_computed_tokens``, the queues, the KV
free count (``gauges`` inside a decode run) and ``num_steps``. Per step:

* scheduled tokens = a request's ``num_computed_tokens`` after ``complete()`` minus after ``begin()``;
* admitted = requests that left ``waiting`` in ``begin()``, with ``num_computed_tokens`` right then (the
  prefix-cache hit: ``_admit`` sets it, ``complete()`` adds the step's tokens);
* preempted = running requests that ``begin()`` turned PREEMPTED; finished = what ``complete()`` returns.

In jump mode one ``begin``/``complete`` may cover k steps (a decode run). It is split into k records after
checking what a run promises: every running request gained exactly k tokens (a decode gains at most one per
step, so one per step), the waiting queue is untouched, nobody was preempted or finished before the last step;
the used blocks of the inner steps come from ``EngineCore.gauges``. The next arrival or abort caps each run
(``begin(t0, stop_s)``), as a replica does. Every step lasts one second, so step s starts at s seconds.
"""

from __future__ import annotations

from sim import EngineConfig, EngineCore, Request, RequestStatus
from sim.timebase import TICKS_PER_S

__all__ = ["MODES", "engine_config", "run_sim"]

MODES = {"reference": dict(force_reference=True), "fast": dict(jumps=False), "jump": dict(jumps=True)}
_RUNNING, _PREEMPTED = RequestStatus.RUNNING, RequestStatus.PREEMPTED


class _OneSecondSteps:
    """A ``StepTimeModel`` whose every step lasts exactly one second (decode runs stay possible)."""

    linear_decode = (TICKS_PER_S, 0, 0)

    def step_ticks(self, n_dec, ctx_dec, chunks) -> int:
        return TICKS_PER_S


def engine_config(case: dict, **overrides) -> EngineConfig:
    e = case["engine"]
    return EngineConfig(block_size=e["block_size"], num_gpu_blocks=e["num_gpu_blocks"],
                        max_num_seqs=e["max_num_seqs"], max_num_batched_tokens=e["max_num_batched_tokens"],
                        max_model_len=e["max_model_len"], enable_prefix_caching=e["enable_prefix_caching"],
                        long_prefill_token_threshold=e["long_prefill_token_threshold"] or None,
                        scheduler_reserve_full_isl=e.get("scheduler_reserve_full_isl", True), **overrides)


def _requests(case: dict) -> dict[str, Request]:
    out = {}
    for i, r in enumerate(case["requests"]):
        segs = tuple((int(c), int(n)) for c, n in r["segments"] if n > 0)
        req = Request(r["id"], sum(n for _, n in segs), r["max_tokens"], arrival_time=float(r["arrival_step"]),
                      prompt_segments=segs)
        req.seq_id = i + 1
        out[r["id"]] = req
    return out


def _events(case: dict) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    arrivals: dict[int, list[str]] = {}
    for r in case["requests"]:
        arrivals.setdefault(r["arrival_step"], []).append(r["id"])
    aborts: dict[int, list[str]] = {}
    for a in case.get("aborts", ()):
        aborts.setdefault(a["step"], []).append(a["id"])
    return arrivals, aborts


def _record(step: int, core: EngineCore, scheduled: dict, admitted: dict, preempted: list, finished: list,
            used: int, running: int | None = None, waiting: int | None = None) -> dict:
    return {"step": step, "scheduled": sorted(scheduled.items()), "admitted": sorted(admitted.items()),
            "preempted": sorted(preempted), "finished": sorted(finished), "used_blocks": used,
            "running": len(core.running) if running is None else running,
            "waiting": len(core.waiting) if waiting is None else waiting}


def _take_step(core: EngineCore, step: int, stop_s: float | None) -> list[dict]:
    """One ``begin``/``complete`` starting at ``step``: its record(s)."""
    was_waiting = list(core.waiting)
    was_running = list(core.running)
    n0 = core.num_steps
    end = core.begin(step * TICKS_PER_S, stop_s)
    planned = (end - step * TICKS_PER_S) // TICKS_PER_S  # steps in flight (one second each)
    inner_used = [core.gauges(step + j + 1.5)[2] for j in range(planned - 1)]  # gauges of a run's inner steps
    preempted = [r.request_id for r in was_running if r.status == _PREEMPTED]
    admitted = {r.request_id: r.num_computed_tokens for r in was_waiting if r.status == _RUNNING}
    at_begin = {r: r.num_computed_tokens for r in core.running}
    n_waiting = len(core.waiting)
    done = core.complete()
    k = core.num_steps - n0
    assert k == planned, f"step {step}: begin() planned {planned} steps, complete() took {k}"
    gained = {r.request_id: r.num_computed_tokens - c for r, c in at_begin.items()}
    kv = core.kv
    if k == 1:
        scheduled = {rid: n for rid, n in gained.items() if n > 0}
        return [_record(step, core, scheduled, admitted, preempted, [r.request_id for r in done],
                        kv.num_usable - kv.free)]
    # a decode run of k steps
    assert not preempted and not admitted, f"step {step}: a {k}-step run admitted or preempted"
    assert all(n == k for n in gained.values()), f"step {step}: a {k}-step run gave {gained}"
    assert list(core.waiting) == was_waiting[:n_waiting] and n_waiting == len(was_waiting), "a run touched waiting"
    ones = {rid: 1 for rid in gained}
    recs = [_record(step + j, core, ones, {}, [], [], inner_used[j], len(at_begin), n_waiting)
            for j in range(k - 1)]
    recs.append(_record(step + k - 1, core, ones, {}, [], [r.request_id for r in done], kv.num_usable - kv.free))
    return recs


def run_sim(case: dict, mode: str = "reference", vllm_version: str = "0.19.0", **config_overrides) -> list[dict]:
    """Every step's record of ``case`` through ``sim``'s engine in ``mode`` (``MODES``), mirroring the scheduler
    of ``vllm_version`` (``EngineConfig.vllm_version``)."""
    core = EngineCore(engine_config(case, vllm_version=vllm_version, **config_overrides), _OneSecondSteps(),
                      check_invariants=True, **MODES[mode])
    reqs = _requests(case)
    for r in reqs.values():
        if core.validate(r) is not None:
            raise ValueError(f"{case['id']}: request {r.request_id} is invalid: {core.validate(r)}")
    arrivals, aborts = _events(case)
    events = sorted({*arrivals, *aborts})
    last_event = events[-1] if events else 0
    records: list[dict] = []
    step = 0
    while step < case["max_steps"] and (step <= last_event or not core.idle):
        for rid in aborts.get(step, ()):
            if reqs[rid] in core.running or reqs[rid] in core.waiting:  # arrived, not finished
                core.abort(reqs[rid])
        for rid in arrivals.get(step, ()):
            core.add_request(reqs[rid], float(step))
        if core.idle:
            records.append(_record(step, core, {}, {}, [], [], core.kv.num_usable - core.kv.free))
            step += 1
            continue
        nxt = next((e for e in events if e > step), None)
        new = _take_step(core, step, None if nxt is None else float(nxt))
        records += new
        step += len(new)
    return records[: case["max_steps"]]
