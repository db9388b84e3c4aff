"""Small harnesses shared by the simulator tests."""

from __future__ import annotations

from sim import EngineConfig, EngineCore, PhysicsCoefficients, Request
from sim.latency import PhysicsStepModel
from sim.profiles import load_profile

#: the simulator's three engine modes (``make_world`` keyword arguments), which must give bit-identical results
ENGINE_MODES = {"jump": dict(jumps=True), "fast": dict(jumps=False), "reference": dict(force_reference=True)}


def constant_model(step_s: float = 0.01) -> PhysicsStepModel:
    """Every step lasts exactly ``step_s`` (all roofline terms weighted 0)."""
    p = load_profile("h100-llama-3.1-8b")
    zero = {n: 0.0 for n in ("pf_compute", "pf_kv", "dc_compute", "dc_kv", "weight", "tp", "layer_s", "req_s", "chunk_s")}
    return PhysicsStepModel(p.hardware, p.model, 1, PhysicsCoefficients(step_s=step_s, **zero))


def constant_profile(step_s: float = 0.01, **engine):
    """The H100 8B profile with constant step time, no frontend/streaming overheads, engine overrides."""
    from dataclasses import replace

    from sim import Overheads

    p = load_profile("h100-llama-3.1-8b")
    coeffs = {n: 0.0 for n in p.latency_coefficients}
    coeffs["step_s"] = step_s
    return p.replace(latency_coefficients=coeffs, overheads=Overheads(), engine=replace(p.engine, **engine))


class Harness:
    """Drive an EngineCore step by step; ``arrivals[k]`` are added before step k (0-based)."""

    def __init__(self, step_s: float = 0.01, mode: str = "reference", **cfg):
        self.core = EngineCore(EngineConfig(**cfg), constant_model(step_s), jumps=(mode == "jump"),
                               force_reference=(mode == "reference"), check_invariants=True)
        self.core.step_records = []
        self.finished: list[Request] = []
        self._seq = 0

    def request(self, rid: str, prompt: int, out: int, segments=None) -> Request:
        self._seq += 1
        r = Request(rid, prompt, out, prompt_segments=segments)
        r.seq_id = self._seq
        return r

    @property
    def trace(self) -> list[tuple[float, list[tuple[str, int]], list[str]]]:
        """``(start_s, [(request_id, tokens)], [preempted ids])`` per step, from ``core.step_records``."""
        return [(r.start_s, list(r.num_scheduled_tokens), list(r.preempted_req_ids)) for r in self.core.step_records]

    def add(self, req: Request) -> None:
        assert self.core.validate(req) is None
        self.core.add_request(req, self.core.t / 10**15)

    def step(self) -> list[Request]:
        end = self.core.begin(self.core.t)
        assert end is not None, "nothing to do"
        done = self.core.complete()
        self.finished += done
        return done

    def run(self, max_steps: int = 10_000) -> None:
        for _ in range(max_steps):
            if self.core.idle:
                return
            self.step()
        raise AssertionError("did not finish")
