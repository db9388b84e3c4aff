"""Scheduler conformance: the same request streams through ``sim``'s engine and through vLLM's own ``Scheduler``.

A *case* is a JSON-able dict (engine limits, requests with an arrival step, prompt content as segments, a
max_tokens, aborts at given steps). ``run_vllm`` drives vLLM's v1 scheduler in its own environment
(``traces/vllm_sched_driver.py`` under ``traces.vllm_cpu``'s venv, one subprocess per batch of cases: the
import costs seconds); ``traces.conformance_sim.run_sim`` drives ``sim.EngineCore`` in any of its three modes.
Both give one record per engine step (``FIELDS``) and ``first_divergence`` names the first step and field
where they differ. Time plays no role: arrivals and aborts happen before the ``schedule()`` of their step.

Prompt content: a request's prompt is a sequence of segments ``(content_id, num_tokens)``. The simulator
takes them as ``prompt_segments``; vLLM gets real token ids, content ``c`` expanded to the first
``num_tokens`` tokens of a pseudo-random stream seeded by ``c`` (``segment_tokens``), so two prompts share
exactly the full blocks where their segment sequences agree, as the simulator's content chain assumes.
Output tokens are pseudo-random per request, so nobody else can hit a request's output blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["FIELDS", "ConformanceError", "SchedulerDriver", "compare_cases", "describe_divergence", "first_divergence", "random_case",
           "random_cases", "run_vllm", "segment_tokens", "vllm_batch"]

#: the per-step record, compared field by field in this order (see ``traces/vllm_sched_driver.py``)
FIELDS = ("scheduled", "preempted", "admitted", "finished", "used_blocks", "running", "waiting")
VOCAB = 32000  # the tiny model's vocabulary (traces.vllm_cpu.TINY_CONFIG)
MAX_STEPS = 5000
_DRIVER = Path(__file__).with_name("vllm_sched_driver.py")


class ConformanceError(RuntimeError):
    """vLLM's side could not run (not installed, a crash, a case it rejected); the message says why."""


def segment_tokens(content_id: int, num_tokens: int) -> list[int]:
    """The first ``num_tokens`` token ids of content ``content_id`` (a fixed pseudo-random stream)."""
    rng = np.random.default_rng([int(content_id), 0x5E6])
    return rng.integers(3, VOCAB, size=int(num_tokens)).tolist()


# ---------------------------------------------------------------------------------------------- random cases
def _engine(rng: np.random.Generator) -> dict:
    """Small limits so that few requests exercise chunking, slot limits, tight KV and preemption."""
    bs = int(rng.choice([2, 4, 8, 16]))
    max_num_seqs = int(rng.integers(1, 9))
    budget = int(rng.integers(max(max_num_seqs, 4), 65))  # vLLM requires max_num_batched_tokens >= max_num_seqs
    max_model_len = int(rng.integers(max(8, 2 * bs), 129))
    min_blocks = -(-max_model_len // bs)
    extra = int(rng.integers(0, 3)) if rng.random() < 0.6 else int(rng.integers(0, 3 * min_blocks + 1))
    return {"block_size": bs, "num_gpu_blocks": min_blocks + extra + 1, "max_num_seqs": max_num_seqs,
            "max_num_batched_tokens": budget, "max_model_len": max_model_len,
            "enable_prefix_caching": bool(rng.random() < 0.75),
            "long_prefill_token_threshold": int(rng.integers(1, max_model_len + 1)) if rng.random() < 0.3 else 0,
            "scheduler_reserve_full_isl": bool(rng.random() < 0.75)}


def _segments(rng: np.random.Generator, i: int, room: int, pool: list[int], earlier: list[list]) -> list[list]:
    """Prompt segments of request ``i`` with at most ``room`` tokens: a shared system prompt, maybe a shared
    second level, a private tail; sometimes a copy (or a truncation) of an earlier request's prompt."""
    if earlier and rng.random() < 0.12:
        segs, left = [], room
        for cid, n in earlier[int(rng.integers(len(earlier)))]:
            if left > 0:
                segs.append([cid, min(n, left)])
                left -= min(n, left)
        return segs
    segs: list[list] = []
    left = room
    if rng.random() < 0.7:
        k = int(rng.integers(len(pool)))
        n = min(pool[k], left)
        segs.append([k, n])
        left -= n
        if left > 0 and rng.random() < 0.4:
            n = int(rng.integers(1, left + 1))
            segs.append([100 + 10 * k + int(rng.integers(3)), n])
            left -= n
    tail = int(rng.integers(0 if segs else 1, left + 1)) if left > 0 else 0
    if tail:
        segs.append([10_000 + i, tail])
    return segs


def random_case(seed: int) -> dict:
    """One reproducible random case (``seed`` decides everything)."""
    rng = np.random.default_rng([int(seed), 0xC0F])
    eng = _engine(rng)
    mml = eng["max_model_len"]
    pool = [int(rng.integers(1, mml)) for _ in range(int(rng.integers(1, 4)))]
    n_req = int(rng.integers(1, 25))
    step, requests, aborts, earlier = 0, [], [], []
    for i in range(n_req):
        step += 0 if rng.random() < 0.5 else int(rng.integers(1, 15))
        max_tokens = int(rng.integers(1, min(32, mml - 1) + 1))
        segs = _segments(rng, i, mml - max_tokens, pool, earlier)
        earlier.append(segs)
        rid = f"r{i}"
        requests.append({"id": rid, "arrival_step": step, "segments": segs, "max_tokens": max_tokens})
        if rng.random() < 0.1:
            aborts.append({"id": rid, "step": step + int(rng.integers(0, 30))})
    return {"id": f"case-{seed}", "seed": int(seed), "engine": eng, "requests": requests, "aborts": aborts,
            "max_steps": MAX_STEPS}


def random_cases(n: int, seed: int = 0) -> list[dict]:
    """``n`` cases, the k-th from seed ``seed * 1_000_003 + k`` (disjoint for nearby seeds)."""
    return [random_case(seed * 1_000_003 + k) for k in range(n)]


# ---------------------------------------------------------------------------------------------- vLLM's side
def vllm_batch(cases: Sequence[dict], model_dir: str) -> dict:
    """The driver's input: prompts and outputs as token ids."""
    out = []
    for case in cases:
        reqs = []
        for i, r in enumerate(case["requests"]):
            prompt = [t for cid, n in r["segments"] for t in segment_tokens(cid, n)]
            rng = np.random.default_rng([case["seed"], i, 7])
            reqs.append({**r, "prompt": prompt, "output": rng.integers(3, VOCAB, size=r["max_tokens"]).tolist()})
        out.append({**case, "requests": reqs})
    return {"model_dir": model_dir, "cases": out}


def _driver_env(version: str) -> tuple[str, dict[str, str]]:
    """The python and environment that import vLLM ``version`` (installed on first use)."""
    from .vllm_cpu import DEFAULT_VERSION, VllmCpuError, cache_root, ensure_scheduler_target, ensure_venv

    try:
        py = ensure_venv()
        target = None if version == DEFAULT_VERSION else ensure_scheduler_target(version)
    except VllmCpuError as e:
        raise ConformanceError(f"cannot install vLLM {version} for the conformance check: {e}") from e
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
                "DO_NOT_TRACK": "1", "VLLM_LOGGING_LEVEL": "ERROR", "OMP_NUM_THREADS": "1"})
    if target is not None:
        env["PYTHONPATH"] = str(target)
    # vLLM caches what it learns of a model class (a subprocess import, tens of seconds here) under
    # VLLM_CACHE_ROOT/modelinfos, one file per class for every release: give each release its own root, or two
    # releases keep invalidating each other's entry
    env["VLLM_CACHE_ROOT"] = str(cache_root() / f"vllm-cache-{version}")
    return str(py), env


def start_vllm(cases: Sequence[dict], version: str, workdir: str | Path) -> tuple[subprocess.Popen, Path]:
    """Start vLLM ``version``'s scheduler on ``cases`` (a subprocess); ``finish_vllm`` collects the records."""
    from .vllm_cpu import write_tiny_model

    work = Path(workdir)
    model_dir = write_tiny_model(work / "model")
    src, dst = work / f"cases-{version}.json", work / f"steps-{version}.json"
    src.write_text(json.dumps(vllm_batch(cases, str(model_dir))))
    py, env = _driver_env(version)
    log = open(work / f"driver-{version}.log", "w")  # noqa: SIM115 - closed by the child's exit
    proc = subprocess.Popen([py, str(_DRIVER), str(src), str(dst)], stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=str(work))
    log.close()
    return proc, dst


def finish_vllm(proc: subprocess.Popen, dst: Path, version: str, timeout_s: float = 900.0) -> dict[str, list]:
    """Wait for ``start_vllm``'s subprocess: ``{case id: steps}``; ``ConformanceError`` on any failure."""
    rc = proc.wait(timeout=timeout_s)
    log = dst.with_name(f"driver-{version}.log")
    if rc != 0 or not dst.exists():
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        raise ConformanceError(f"vLLM {version}'s scheduler driver failed (exit {rc}); log {log}:\n{tail}")
    answer = json.loads(dst.read_text())
    if answer["vllm_version"] != version:
        raise ConformanceError(f"asked for vLLM {version}, the driver imported {answer['vllm_version']}")
    bad = [f"{r['id']}: {r['error']}" for r in answer["results"] if r["error"]]
    if bad:
        raise ConformanceError(f"vLLM {version} rejected {len(bad)} case(s): " + "; ".join(bad[:5]))
    return {r["id"]: r["steps"] for r in answer["results"]}


def run_vllm(cases: Sequence[dict], versions: Sequence[str]) -> dict[str, dict[str, list]]:
    """``{version: {case id: steps}}``, the versions' drivers running side by side."""
    with tempfile.TemporaryDirectory(prefix="maslat-conformance-") as tmp:
        started: dict[str, tuple[subprocess.Popen, Path]] = {}
        try:
            for v in versions:
                work = Path(tmp) / v
                work.mkdir()
                started[v] = start_vllm(cases, v, work)
            return {v: finish_vllm(p, dst, v) for v, (p, dst) in started.items()}
        finally:
            for p, _ in started.values():
                if p.poll() is None:
                    p.kill()
                    p.wait()


class SchedulerDriver:
    """A persistent driver process of vLLM ``version``'s scheduler (``vllm_sched_driver.py --serve``): vLLM is
    imported once, then every ``run(cases)`` is one line out and one line back, so a property-based test can send
    cases one by one (and shrink a failing one) without paying the import per case. Use as a context manager, or
    call ``close()``; the process is stopped by its own handle."""

    def __init__(self, version: str, workdir: str | Path, *, timeout_s: float = 600.0):
        from .vllm_cpu import write_tiny_model

        self.version, self.timeout_s = version, timeout_s
        work = Path(workdir)
        work.mkdir(parents=True, exist_ok=True)
        self.model_dir = str(write_tiny_model(work / "model"))
        self._log_path = work / f"driver-{version}.log"
        py, env = _driver_env(version)
        with open(self._log_path, "w") as log:
            self.proc = subprocess.Popen([py, str(_DRIVER), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=log, env=env, cwd=str(work), text=True)
        hello = self._read()
        if hello.get("vllm_version") != version:
            self.close()
            raise ConformanceError(f"asked for vLLM {version}, the driver imported {hello.get('vllm_version')}")

    def _read(self) -> dict:
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.close()
            tail = self._log_path.read_text(errors="replace")[-3000:] if self._log_path.exists() else ""
            raise ConformanceError(f"vLLM {self.version}'s scheduler driver stopped answering "
                                   f"(exit {self.proc.returncode}); log {self._log_path}:\n{tail}")
        return json.loads(line)

    def send(self, cases: Sequence[dict]) -> None:
        """Start ``cases`` (the answer is ``receive()``'s; two drivers run side by side between the calls)."""
        self.proc.stdin.write(json.dumps(vllm_batch(cases, self.model_dir)) + "\n")
        self.proc.stdin.flush()

    def run(self, cases: Sequence[dict]) -> dict[str, list]:
        """``{case id: steps}`` for ``cases``; ``ConformanceError`` when vLLM rejects one."""
        self.send(cases)
        return self.receive()

    def receive(self) -> dict[str, list]:
        """The answer to the last ``send``: ``{case id: steps}``; ``ConformanceError`` when vLLM rejects one."""
        answer = self._read()
        bad = [f"{r['id']}: {r['error']}" for r in answer["results"] if r["error"]]
        if bad:
            raise ConformanceError(f"vLLM {self.version} rejected {len(bad)} case(s): " + "; ".join(bad[:5]))
        return {r["id"]: r["steps"] for r in answer["results"]}

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> SchedulerDriver:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- comparison
def _norm(value):
    return [list(x) for x in value] if isinstance(value, list) and value and isinstance(value[0], (list, tuple)) else value


def first_divergence(expected: Sequence[dict], got: Sequence[dict]) -> dict | None:
    """The first step and field where two step records differ (``None`` when identical), with both values."""
    for a, b in zip(expected, got, strict=False):
        for f in FIELDS:
            if _norm(a[f]) != _norm(b[f]):
                return {"step": a["step"], "field": f, "expected": a[f], "got": b[f], "expected_step": a,
                        "got_step": b}
    if len(expected) != len(got):
        n = min(len(expected), len(got))
        return {"step": n, "field": "num_steps", "expected": len(expected), "got": len(got)}
    return None


def describe_divergence(case: dict, d: dict, version: str, mode: str) -> str:
    reqs = {r["id"]: r for r in case["requests"]}
    ids = {x[0] for f in ("expected", "got") if isinstance(d[f], list) for x in d[f] if isinstance(x, (list, tuple))}
    lines = [f"vLLM {version} vs sim ({mode}): {case['id']} (traces.conformance.random_case({case['seed']})), "
             f"step {d['step']}, field {d['field']!r}: vLLM {d['expected']} != sim {d['got']}",
             f"  engine {json.dumps(case['engine'])}"]
    lines += [f"  {rid}: {json.dumps(reqs[rid])}" for rid in sorted(ids) if rid in reqs]
    if "expected_step" in d:
        lines += [f"  vLLM step: {json.dumps(d['expected_step'])}", f"  sim step:  {json.dumps(d['got_step'])}"]
    return "\n".join(lines)


def compare_cases(cases: Sequence[dict], expected: dict[str, list], sim_steps) -> dict:
    """Case and step agreement of one version and one mode: ``sim_steps(case) -> steps``."""
    identical = steps_same = steps = 0
    first = None
    for case in cases:
        want, got = expected[case["id"]], sim_steps(case)
        steps += len(want)
        d = first_divergence(want, got)
        if d is None:
            identical += 1
            steps_same += len(want)
        else:
            steps_same += d["step"]
            first = first or (case, d)
    return {"cases": len(cases), "cases_identical": identical, "steps": steps, "steps_identical": steps_same,
            "first_divergence": first}
