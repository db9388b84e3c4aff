"""The two-phase estimator dataset (docs/system_aware.md#4-estimators), generated against the simulator.

Phase 1 (``phase1``): run planned topologies (MasRouter's modes, ``envs.topologies``) with *random*
models and strategies, so that the prompt chains are diverse (agent A's output is agent B's input), and
save every agent prompt: ``intermediate_prompts.csv`` with the seed's ``prompt_text`` and ``role_id``,
plus what the simulator knows about the prompt (``task``, ``split``, ``query``, ``node``, ``prompt_tokens``).
``prompt_text`` is a synthetic text of exactly ``prompt_tokens`` tokens (one short English word per
token under Llama-3's and the stand-in server's tokenizers), so the same file drives the live Phase 2
(``maslat collect --phase2 --prompts intermediate_prompts.csv``) against any OpenAI-compatible server.

Phase 2 (``phase2``): for every target model and background concurrency N (closed-loop clients that send
Phase-1 prompts with random strategies to that model, the seed's N = 1, 10, 50), replay every Phase-1
prompt with every strategy, one probe at a time: read the pool's gauges just before the call, send it,
measure it. ``phase2.csv`` has exactly the seed's columns (``traces.phase2.PHASE2_COLUMNS``);
``phase2_aux.csv`` is row-aligned and adds what an estimator may use beyond them (``ttft_ema_ms``, the
Phase-1 row, N).

Output lengths are the task model's natural lengths for (task, role, strategy, model, query) with fresh
noise per call (stream ``phase2/lengths``): the randomness of generation that ``F_len`` cannot remove.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import sim

from .cmdp_catalog import (
    ROLES,
    STRATEGY_NAMES,
    STRATEGY_PROMPT_TOKENS,
    ModelEntry,
    default_models,
    role_lengths,
    strategy_length_factor,
)
from .cmdp_query import QueryState
from .cmdp_world import pool_state
from .embeddings import text_seed
from .operators import LENGTH_SIGMA, MAX_COMPLETION_TOKENS, quality
from .tasks import make_queries, make_task, task_key
from .topologies import make_planner

__all__ = ["PHASE1_COLUMNS", "PHASE2_COLUMNS", "Phase2Config", "phase1", "phase2", "read_phase1", "read_phase2",
           "synthetic_text", "write_csv"]

PHASE1_COLUMNS = ("prompt_text", "role_id", "task", "split", "query", "node", "prompt_tokens")
#: the seed's Phase-2 columns, in its order (same as ``traces.phase2.PHASE2_COLUMNS``)
PHASE2_COLUMNS = ("queue_waiting", "queue_running", "kv_utilization", "model_id", "role_id", "strategy_id",
                  "total_input_tokens", "actual_ttft", "actual_tpot", "output_tokens")
AUX_COLUMNS = ("prompt_row", "concurrency", "ttft_ema_ms", "task", "query")

_WORDS = ("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "with", "was", "on", "be", "by", "this",
          "are", "or", "from", "at", "an", "which", "have", "not", "but", "all", "can", "one", "its", "more", "list",
          "sum", "value", "code", "test", "print", "each", "then", "step", "count", "total", "input", "return",
          "find", "number", "if", "else", "true", "false", "loop")
_WORDS = tuple(w for w in _WORDS if len(w) <= 5)


def synthetic_text(num_tokens: int, seed: int) -> str:
    """``num_tokens`` short common words (one token each), chosen deterministically from ``seed``."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), int(num_tokens)))


# ------------------------------------------------------------------------------------------ phase 1
def phase1(tasks: Sequence[str] = ("mbpp",), *, split: str = "train", max_queries: int | None = None,
           seed: int = 0, dataset_seed: int = 0, planner: str = "mix",
           models: tuple[ModelEntry, ...] | None = None) -> pd.DataFrame:
    """Every agent prompt of each task's queries run once through its planned topology, with random
    (model, strategy) per call. Deterministic given ``seed``. Lengths only depend on the strategies, so no
    serving needs to be simulated: a prompt is the role's instructions, the query and its inputs' outputs."""
    models = models or default_models()
    rows = []
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1])))
    for task in tasks:
        spec = make_task(task)
        qs = make_queries(spec, split, dataset_seed)
        plan = make_planner(planner, spec.kind, dataset_seed)
        qual = quality(spec)
        n = len(qs) if max_queries is None else min(max_queries, len(qs))
        for q in range(n):
            topo = plan(q, 1 if split == "train" else 2)
            st = QueryState(task=spec, quality=qual, models=tuple(m.name for m in models), topology=topo,
                            difficulty=float(qs.difficulty[q]), query_tokens=int(qs.prompt_tokens[q]),
                            query_content_id=q, seed_words=[seed, task_key(task), q])
            for node in topo.nodes:
                m, s = int(rng.integers(len(models))), int(rng.integers(len(STRATEGY_NAMES)))
                base = st.base_prompt_tokens(node)
                call = st.call(node, s)
                st.finish(node, m, s, call.completion_tokens)
                text = synthetic_text(base, text_seed(f"phase1/{task}/{split}/{q}/{node.index}/{seed}"))
                rows.append((text, node.role, task, split, q, node.index, base))
    return pd.DataFrame(rows, columns=list(PHASE1_COLUMNS))


def read_phase1(path: str | Path) -> pd.DataFrame:
    """An ``intermediate_prompts.csv`` written by ``phase1``; a bad row raises naming file, line and field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Phase-1 prompts file")
    df = pd.read_csv(path, keep_default_na=False)
    missing = [c for c in PHASE1_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {missing} (a simulator Phase-1 file has {list(PHASE1_COLUMNS)})")
    for i, row in enumerate(df.itertuples(index=False), start=2):
        if row.role_id not in ROLES:
            raise ValueError(f"{path}:{i}: field role_id: unknown role {row.role_id!r}; roles: {sorted(ROLES)}")
        if not (isinstance(row.prompt_tokens, int | np.integer) and row.prompt_tokens >= 1):
            raise ValueError(f"{path}:{i}: field prompt_tokens must be an integer >= 1, got {row.prompt_tokens!r}")
    return df


# ------------------------------------------------------------------------------------------ phase 2
@dataclass(frozen=True, slots=True, kw_only=True)
class Phase2Config:
    """Attributes:
        concurrency: background closed-loop clients per target model (the seed: 1, 10, 50).
        repeats: passes over every (prompt, strategy) pair per (model, N).
        warmup_s: simulated seconds of background before the first probe of each (model, N).
        max_prompts: use a seeded sample of at most this many Phase-1 rows (``None``: all).
        seed: root seed (background, lengths, sampling).
    """

    concurrency: tuple[int, ...] = (1, 10, 50)
    repeats: int = 1
    warmup_s: float = 20.0
    max_prompts: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.concurrency or any(int(n) != n or n < 0 for n in self.concurrency):
            raise ValueError(f"concurrency must be integers >= 0, got {self.concurrency!r}")
        if self.repeats < 1 or self.warmup_s < 0 or (self.max_prompts is not None and self.max_prompts < 1):
            raise ValueError("repeats and max_prompts must be >= 1 and warmup_s >= 0")


class _Lengths:
    """Natural completion lengths of Phase-1 prompts per strategy, with fresh noise per call."""

    def __init__(self, p1: pd.DataFrame, dataset_seed: int, rng: np.random.Generator):
        self.rng = rng
        self.mean = np.zeros((len(p1), len(STRATEGY_NAMES)))
        cache = {}
        for i, row in enumerate(p1.itertuples(index=False)):
            key = (row.task, row.split)
            if key not in cache:
                spec = make_task(row.task)
                cache[key] = (spec, make_queries(spec, row.split, dataset_seed), quality(spec))
            spec, qs, qual = cache[key]
            z = float(qs.difficulty[row.query]) / qual.cal.spread
            base = role_lengths(spec, row.role_id)[0] * np.exp(spec.length_difficulty * z)
            self.mean[i] = [base * strategy_length_factor(spec, row.role_id, s) for s in STRATEGY_NAMES]

    def draw(self, row: int, strategy: int) -> int:
        s = LENGTH_SIGMA
        x = self.mean[row, strategy] * np.exp(s * self.rng.standard_normal() - s * s / 2)
        return int(min(max(round(float(x)), 1), MAX_COMPLETION_TOKENS))


def _prompt_tokens(p1: pd.DataFrame, row: int, strategy: int) -> int:
    return int(p1.prompt_tokens.iat[row]) + STRATEGY_PROMPT_TOKENS[STRATEGY_NAMES[strategy]]


def _background(world: sim.World, pool: str, p1: pd.DataFrame, lengths: _Lengths, rng: np.random.Generator,
                stop: list[bool]):
    while not stop[0]:
        r, s = int(rng.integers(len(p1))), int(rng.integers(len(STRATEGY_NAMES)))
        yield world.submit(pool, _prompt_tokens(p1, r, s), lengths.draw(r, s), wait=True)


def phase2(p1: pd.DataFrame, cfg: Phase2Config = Phase2Config(), *, models: tuple[ModelEntry, ...] | None = None,
           dataset_seed: int = 0, progress: Callable[[int], None] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(phase2 rows with the seed's columns, row-aligned aux rows); see the module docstring."""
    models = models or default_models()
    root = np.random.SeedSequence([cfg.seed, 2])
    s_sample, s_len, s_bg = root.spawn(3)
    if cfg.max_prompts is not None and cfg.max_prompts < len(p1):
        pick = np.sort(np.random.Generator(np.random.PCG64(s_sample)).choice(len(p1), cfg.max_prompts, replace=False))
        p1 = p1.iloc[pick].reset_index(drop=True)
        rows_of = pick
    else:
        rows_of = np.arange(len(p1))
    lengths = _Lengths(p1, dataset_seed, np.random.Generator(np.random.PCG64(s_len)))
    bg_rng = np.random.Generator(np.random.PCG64(s_bg))
    out, aux = [], []
    state = np.zeros(4)
    for mi, m in enumerate(models):
        for n in cfg.concurrency:
            world = sim.make_world(sim.PoolSpec(name=m.name, profile=sim.load_profile(m.profile), replicas=m.replicas,
                                                router="least_outstanding"),
                                   seed=int(cfg.seed * 1000 + mi * 100 + n), sample_interval_s=None, keep_records=False)
            stop = [False]
            for _ in range(int(n)):
                world.env.process(_background(world, m.name, p1, lengths, bg_rng, stop))
            world.run(until=cfg.warmup_s)
            for _ in range(cfg.repeats):
                for r in range(len(p1)):
                    for s in range(len(STRATEGY_NAMES)):
                        pool_state(world, m.name, state)
                        p, o = _prompt_tokens(p1, r, s), lengths.draw(r, s)
                        t0 = world.now
                        req = world.submit(m.name, p, o, wait=True)
                        world.run(until=req)
                        rq = req.value
                        if rq.reject_reason is not None:
                            continue
                        ttft = (rq.first_token_ts - t0) * 1e3
                        tpot = (rq.last_token_ts - rq.first_token_ts) / (o - 1) * 1e3 if o > 1 else 0.0
                        out.append((int(state[0]), int(state[1]), float(state[2]), m.name, p1.role_id.iat[r],
                                    STRATEGY_NAMES[s], p, ttft, tpot, o))
                        aux.append((int(rows_of[r]), int(n), float(state[3]), p1.task.iat[r], int(p1["query"].iat[r])))
                    if progress is not None:
                        progress(len(STRATEGY_NAMES))
            stop[0] = True
    return pd.DataFrame(out, columns=list(PHASE2_COLUMNS)), pd.DataFrame(aux, columns=list(AUX_COLUMNS))


def read_phase2(path: str | Path, aux_path: str | Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``phase2.csv`` (seed columns, checked) and, if given or present beside it, ``phase2_aux.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Phase-2 dataset")
    df = pd.read_csv(path)
    if tuple(df.columns) != PHASE2_COLUMNS:
        raise ValueError(f"{path}:1: columns must be exactly {list(PHASE2_COLUMNS)}, got {list(df.columns)}")
    num = [c for c in PHASE2_COLUMNS if c not in ("model_id", "role_id", "strategy_id")]
    for c in num:
        bad = ~np.isfinite(pd.to_numeric(df[c], errors="coerce"))
        if c == "kv_utilization":
            bad &= df[c].notna()
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise ValueError(f"{path}:{i + 2}: field {c} is not a finite number: {df[c].iat[i]!r}")
    aux_path = Path(aux_path) if aux_path is not None else path.with_name("phase2_aux.csv")
    aux = None
    if aux_path.is_file():
        aux = pd.read_csv(aux_path)
        if len(aux) != len(df) or tuple(aux.columns) != AUX_COLUMNS:
            raise ValueError(f"{aux_path}: must be row-aligned with {path} ({len(df)} rows) and have columns "
                             f"{list(AUX_COLUMNS)}")
    return df, aux


def write_csv(df: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False, quoting=csv.QUOTE_MINIMAL)
    return path
