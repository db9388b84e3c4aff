"""Phase 2 of the two-phase estimator dataset (``docs/system_aware.md#4-estimators``).

For every Phase-1 prompt (``intermediate_prompts.csv``: ``prompt_text``, ``role_id``) and every prompt
strategy, append the strategy's instruction and send the call to the target model while background load
runs, recording the system state just before the call and what the call measured. The background load is
``concurrency`` closed-loop clients sending Phase-1 prompts with random strategies (the seed's N = 1, 10,
50; 0 = none). Probes go one at a time, so they disturb the state they sample as little as possible.

``phase2.csv`` has exactly the seed's columns:

=====================  ===================================================================================
``queue_waiting``      ``vllm:num_requests_waiting`` (summed over engines), scraped just before the call
``queue_running``      ``vllm:num_requests_running`` (summed over engines), same scrape
``kv_utilization``     ``vllm:kv_cache_usage_perc`` (0-1, mean over engines), same scrape
``model_id``           the target model (``--model-id``, default the served model name)
``role_id``            from the Phase-1 CSV, as written there
``strategy_id``        the strategy's name (``Flash``, ``Concise``, ``DeepThink``)
``total_input_tokens`` ``usage.prompt_tokens`` of the call (Phase-1 prompt + strategy text + template)
``actual_ttft``        milliseconds from sending to the first output chunk (client side)
``actual_tpot``        milliseconds, (last chunk - first chunk) / (output_tokens - 1); 0 for one token
``output_tokens``      ``usage.completion_tokens`` (natural length: no ``ignore_eos``; capped by max_tokens)
=====================  ===================================================================================

``phase2_aux.csv`` is row-aligned with it and adds what an estimator may use beyond the seed's columns
(``PHASE2_AUX_COLUMNS``, the same file ``envs.cmdp_dataset`` writes in simulation): the Phase-1 row of the
probe, the background concurrency N, an EMA (alpha 0.2, as vLLM-like engines keep) of the client-side TTFT
of every call answered so far, and the prompt's ``task``/``query`` when the Phase-1 file has them.

Every call (probes and background) is also in the run's ``requests.jsonl`` with ``kind``, ``role_id``
and ``strategy_id``. A probe that fails, or whose scrape failed, gives no row; both are counted in
``meta.json``. The stand-in server has no EOS, so against it ``output_tokens`` equals ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .client import chat_body

__all__ = ["PHASE2_AUX_COLUMNS", "PHASE2_COLUMNS", "STRATEGIES", "Phase1Prompt", "Phase2Config", "read_phase1",
           "read_prompts", "run_phase2"]

PHASE2_COLUMNS = ("queue_waiting", "queue_running", "kv_utilization", "model_id", "role_id", "strategy_id",
                  "total_input_tokens", "actual_ttft", "actual_tpot", "output_tokens")
PHASE2_AUX_COLUMNS = ("prompt_row", "concurrency", "ttft_ema_ms", "task", "query")
TTFT_EMA_ALPHA = 0.2

#: strategy -> instruction appended to the prompt (Chain of Draft, arXiv 2502.18600: Standard ~ Flash,
#: CoD ~ Concise, CoT ~ DeepThink; docs/system_aware.md#8-strategy-lengths)
STRATEGIES = {
    "Flash": "Answer directly, with no preamble, explanation or reasoning. Give the final answer after ####.",
    "Concise": "Think step by step, but keep only a minimum draft of each step, at most five words per step. "
               "Give the final answer after ####.",
    "DeepThink": "Think step by step. Give the final answer after ####.",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Phase2Config:
    """Attributes:
        prompts_csv: the Phase-1 CSV (columns ``prompt_text`` and ``role_id``).
        strategies: names from ``STRATEGIES``.
        max_tokens: cap on each call's output.
        repeats: passes over every (prompt, strategy) pair.
        model_id: the ``model_id`` column (default: the served model name).
        limit: use only the first ``limit`` prompts.
        warmup_s: seconds of background load before the first probe.
    """

    prompts_csv: Path
    strategies: tuple[str, ...] = ("Flash", "Concise", "DeepThink")
    max_tokens: int = 1024
    repeats: int = 1
    model_id: str | None = None
    limit: int | None = None
    warmup_s: float = 2.0

    def __post_init__(self) -> None:
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
        if self.max_tokens < 1 or self.repeats < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("max_tokens, repeats and limit must be >= 1")
        if self.warmup_s < 0:
            raise ValueError("warmup_s must be >= 0")


class Phase1Prompt(NamedTuple):
    """One row of a Phase-1 prompts file; ``task``/``query`` are ``("", -1)`` unless the file has them
    (simulator files do)."""

    text: str
    role: str
    task: str
    query: int


def read_phase1(path: str | Path, limit: int | None = None) -> list[Phase1Prompt]:
    """The rows of a Phase-1 CSV; a bad row raises naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Phase-1 prompts file")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        fields = set(reader.fieldnames or ())
        missing = {"prompt_text", "role_id"} - fields
        if missing:
            raise ValueError(f"{path}:1: missing column(s) {sorted(missing)} (need prompt_text, role_id)")
        keyed = {"task", "query"} <= fields
        rows = []
        for row in reader:
            for key in ("prompt_text", "role_id"):
                if not (row.get(key) or "").strip():
                    raise ValueError(f"{path}:{reader.line_num}: field {key} is empty")
            task, query = "", -1
            if keyed:
                try:
                    task, query = row["task"], int(row["query"])
                except (TypeError, ValueError):
                    raise ValueError(f"{path}:{reader.line_num}: field query is not an integer: {row['query']!r}") from None
            rows.append(Phase1Prompt(row["prompt_text"], row["role_id"].strip(), task, query))
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise ValueError(f"{path}: no prompts")
    return rows


def read_prompts(path: str | Path, limit: int | None = None) -> list[tuple[str, str]]:
    """``[(prompt_text, role_id), ...]`` from a Phase-1 CSV (``read_phase1`` without the keys)."""
    return [(p.text, p.role) for p in read_phase1(path, limit)]


def _content(prompt: str, strategy: str) -> str:
    return f"{prompt}\n\n{STRATEGIES[strategy]}"


class _Phase2:
    def __init__(self, col, session):
        self.col, self.s, self.cfg = col, session, col.cfg.phase2
        self.prompts = read_phase1(self.cfg.prompts_csv, self.cfg.limit)
        self.ttft_ema_ms = math.nan
        self.model = col.info["model"]
        self.url = col.cfg.base_url + "/v1/chat/completions"
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(col.cfg.seed).spawn(4)[3]))
        path = col.cfg.out_dir / "phase2.csv"
        self.file = path.open("w", newline="")
        self.csv = csv.writer(self.file)
        self.csv.writerow(PHASE2_COLUMNS)
        self.file.flush()
        col.closers.append(self.file.close)
        self.aux_file = (col.cfg.out_dir / "phase2_aux.csv").open("w", newline="")
        self.aux = csv.writer(self.aux_file)
        self.aux.writerow(PHASE2_AUX_COLUMNS)
        self.aux_file.flush()
        col.closers.append(self.aux_file.close)
        self.counts = {"phase2_rows": 0, "phase2_probe_failures": 0, "phase2_probes_without_state": 0}
        col.extra_meta["phase2"] = {"prompts_csv": str(self.cfg.prompts_csv), "num_prompts": len(self.prompts),
                                    "strategies": list(self.cfg.strategies), "repeats": self.cfg.repeats,
                                    "max_tokens": self.cfg.max_tokens, "counts": self.counts}

    async def background(self, stop: asyncio.Event) -> None:
        col = self.col
        while not stop.is_set() and not col.stop.is_set():
            prompt, role, _, _ = self.prompts[int(self.rng.integers(len(self.prompts)))]
            strat = self.cfg.strategies[int(self.rng.integers(len(self.cfg.strategies)))]
            body = chat_body(self.model, _content(prompt, strat), self.cfg.max_tokens, ignore_eos=False)
            res = await col.send(self.s, self.url, body, extra={"kind": "background", "role_id": role,
                                                                "strategy_id": strat})
            self._observe(res)
            if res.status is None and res.error and not col.stop.is_set():
                await col.pause(col.cfg.retry_backoff_s)

    def _observe(self, res) -> None:
        """Fold an answered call's client-side TTFT into the EMA."""
        if res.ok and res.chunk_times:
            t = (res.chunk_times[0] - res.sent_mono) * 1e3
            e = self.ttft_ema_ms
            self.ttft_ema_ms = t if math.isnan(e) else TTFT_EMA_ALPHA * t + (1 - TTFT_EMA_ALPHA) * e

    async def probe(self, row: int, prompt: str, role: str, strat: str) -> None:
        col = self.col
        state = await col.scrape()
        ema = self.ttft_ema_ms
        body = chat_body(self.model, _content(prompt, strat), self.cfg.max_tokens, ignore_eos=False)
        res = await col.send(self.s, self.url, body, extra={"kind": "probe", "role_id": role, "strategy_id": strat})
        self._observe(res)
        if not res.ok:
            self.counts["phase2_probe_failures"] += 1
            return
        if state is None:
            self.counts["phase2_probes_without_state"] += 1
            return
        t, n = res.chunk_times, res.output_tokens
        tpot_ms = (t[-1] - t[0]) / (n - 1) * 1e3 if n > 1 else 0.0
        kv = state.kv_usage if state.kv_usage is not None else math.nan
        self.csv.writerow([int(state.waiting), int(state.running), kv, self.cfg.model_id or self.model, role, strat,
                           res.prompt_tokens, (t[0] - res.sent_mono) * 1e3, tpot_ms, n])
        p = self.prompts[row]
        self.aux.writerow([row, col.cfg.concurrency or 0, 0.0 if math.isnan(ema) else ema, p.task, p.query])
        self.file.flush()
        self.aux_file.flush()
        self.counts["phase2_rows"] += 1


async def run_phase2(col, session) -> None:
    """Background load plus one probe per (prompt, strategy, repeat); see the module docstring. The caller
    (``traces.loadgen.run_collection``) drains the background clients once this returns."""
    ph = _Phase2(col, session)
    if col.progress is not None:
        col.progress.total = len(ph.prompts) * len(ph.cfg.strategies) * ph.cfg.repeats
    bg_stop = asyncio.Event()
    for _ in range(col.cfg.concurrency or 0):
        col.spawn(ph.background(bg_stop))
    if col.cfg.concurrency and ph.cfg.warmup_s > 0:
        await col.pause(ph.cfg.warmup_s * col.clock.time_scale)
    for _ in range(ph.cfg.repeats):
        for row, p in enumerate(ph.prompts):
            for strat in ph.cfg.strategies:
                if col.stop.is_set():
                    return
                await ph.probe(row, p.text, p.role, strat)
    bg_stop.set()  # background clients finish the call they are in, then stop (the caller waits for them)
