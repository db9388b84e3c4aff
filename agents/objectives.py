"""LAMaS and MaAS training objectives (``benchmark/benchmark.py``; docs/lamas.md#5-objectives).

Inputs per query i of a batch (in batch order): the score s_i, the cost c_i, the recorded controller
decisions and the environment's per-layer c(op) tokens. Costs follow LAMaS: c_i is the cumulative cost
when query i finished minus the previous query's (``cost_deltas``), so concurrent queries misattribute it.

* ``cp``: per selected operator, u = s - 3c - (lambda/50) * CP_layers for the bottleneck operator of each
  layer (max tokens, ties to the first) and s - 3c for the others; EMA-normalised; a separate
  log(p_j + 1e-10) per operator; loss = -mean(log p * u_hat). Optionally (``QueryBaseline``, a deviation
  from LAMaS, on by default in ``agents.lamas``) each query's mean s - 3c over its earlier visits is
  subtracted first, so that which queries a batch holds no longer drowns the critical-path credit.
* ``no_cp``: u_i = s_i - 3c_i - (lambda/50) * cp_token_i (the reported CP, post-processing included),
  batch mean/std normalisation (centred only if std <= 1e-8); per-query log-prob = sum over layers of
  sum log_softmax of the selected operators (-1.5 for the layer-0 EarlyStop rule).
* ``utility`` (MaAS): u_i = s_i - 3c_i, no normalisation, no baseline, the same per-query log-prob.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .controller import LAYER0_EARLYSTOP_PENALTY, LAMaSController, Trace

__all__ = ["OBJECTIVES", "EMANormaliser", "ObjectiveInput", "QueryBaseline", "bottleneck_utilities", "cost_deltas"]


@dataclass(slots=True)
class ObjectiveInput:
    score: float
    cost_usd: float                  # c_i as LAMaS computes it
    cp_tokens: float                 # reported cp_token (layers + post-processing)
    trace: Trace
    layer_tokens: list[list[float]]  # c(op) of the selected operators, per layer, in selected order
    query: int = -1                  # index of the query in its split (QueryBaseline's key)


class EMANormaliser:
    """Running mean/std over batches: first batch sets them, then x <- 0.95 x + 0.05 x_batch."""

    def __init__(self, momentum: float = 0.95):
        self.momentum = momentum
        self.mean: float | None = None
        self.std: float | None = None

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        bm, bs = float(u.mean()), max(float(u.std(unbiased=False)), 1e-8)
        if self.mean is None:
            self.mean, self.std = bm, bs
        else:
            m = self.momentum
            self.mean = m * self.mean + (1 - m) * bm
            self.std = m * self.std + (1 - m) * bs
        return (u - self.mean) / max(self.std, 1e-8)


class QueryBaseline:
    """Per-query baseline for the ``cp`` objective: the mean of s - 3c over the query's earlier visits.

    Why (a deviation from LAMaS, whose only baseline is the EMA normaliser's mean): the train split is
    repeated every epoch in file order, and whether a query is answered right depends far more on the query
    than on the architecture (the task models' difficulty spread; MBPP: ~20 % of queries wrong under every
    architecture). With one global mean every operator of a hard query is pushed down by about -1.7 std, so
    the critical-path credit (~0.1 against a score of 0 or 1) is noise-dominated and MBPP's controller did
    not shorten its paths in 16 epochs. Subtracting what the query itself scored before keeps the score
    signal where the architecture changed it and removes the part the query fixes. A query's first visit
    falls back to the batch mean (as a plain batch baseline would)."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.visits: dict[int, int] = {}

    def offsets(self, batch: Sequence[ObjectiveInput]) -> list[float]:
        """Baselines for the batch's queries, then record the batch (so a query never sees its own visit)."""
        vals = [b.score - 3.0 * b.cost_usd for b in batch]
        first = float(np.mean(vals))
        out = [self.total[b.query] / self.visits[b.query] if b.query in self.visits else first for b in batch]
        for b, v in zip(batch, vals, strict=True):
            self.total[b.query] = self.total.get(b.query, 0.0) + v
            self.visits[b.query] = self.visits.get(b.query, 0) + 1
        return out


def cost_deltas(cumulative_usd: Sequence[float], previous_usd: float) -> tuple[list[float], float]:
    """LAMaS's c_i: each query's cumulative cost at its end minus the previous one's, in batch order."""
    out, prev = [], previous_usd
    for c in cumulative_usd:
        out.append(c - prev)
        prev = c
    return out, prev


def layer_tokens(trace: Trace, info: dict, names: tuple[str, ...]) -> list[list[float]]:
    """c(op) of each selected operator, looked up by name in the environment's layer record."""
    out = []
    for d, lay in zip(trace.decisions, info["layers"], strict=False):
        tok = dict(zip(lay["ops"], lay["cp_tokens"], strict=True))
        out.append([float(tok[names[j]]) for j in d.selected])
    return out


def bottleneck_utilities(score: float, cost: float, layer_toks: list[list[float]], token_weight: float) -> list[list[float]]:
    """Per-operator utilities with critical-path credit: only each layer's bottleneck carries the penalty."""
    cp_layers = sum(max(t) for t in layer_toks if t)
    base = score - 3.0 * cost
    pen = base - (token_weight / 50.0) * cp_layers
    return [[pen if j == int(np.argmax(t)) else base for j in range(len(t))] for t in layer_toks]


def _layer_probs(ctrl: LAMaSController, batch: Sequence[ObjectiveInput]) -> dict[tuple[int, int], torch.Tensor]:
    """Probabilities with gradient for every (query, layer) decision, grouped by layer for one pass each."""
    out = {}
    for layer in range(len(ctrl.layers)):
        idx = [(i, d) for i, b in enumerate(batch) for d in b.trace.decisions if d.layer == layer]
        if not idx:
            continue
        q = torch.as_tensor(np.stack([batch[i].trace.query for i, _ in idx]))
        prev = torch.as_tensor([min(d.prev, ctrl.num_ops - 1) for _, d in idx])
        p = ctrl.probs(layer, q, prev)
        for r, (i, _) in enumerate(idx):
            out[(i, layer)] = p[r]
    return out


def cp_loss(ctrl, batch, token_weight, norm: EMANormaliser | None, baseline: QueryBaseline | None = None):
    probs = _layer_probs(ctrl, batch)
    lps, us, offs_op = [], [], []
    offs = baseline.offsets(batch) if baseline is not None else [0.0] * len(batch)
    for i, b in enumerate(batch):
        utils = bottleneck_utilities(b.score, b.cost_usd, b.layer_tokens, token_weight)
        for d, u_layer in zip(b.trace.decisions, utils, strict=False):
            p = probs[(i, d.layer)]
            for j, u in zip(d.selected, u_layer, strict=True):
                lps.append(torch.log(p[j] + 1e-10))
                us.append(u)
                offs_op.append(offs[i])
    raw = float(np.mean(us))
    u = torch.tensor(us, dtype=torch.float32) - torch.tensor(offs_op, dtype=torch.float32)
    if norm is not None:
        u = norm(u)
    return -(torch.stack(lps) * u).mean(), raw


def _query_logprob(probs, i: int, trace: Trace) -> torch.Tensor:
    total = torch.zeros(())
    for d in trace.decisions:
        lp = torch.log(probs[(i, d.layer)])[d.selected].sum()
        total = total + lp + (LAYER0_EARLYSTOP_PENALTY if d.penalty else 0.0)
    return total


def per_query_loss(ctrl, batch, token_weight, normalise: bool):
    probs = _layer_probs(ctrl, batch)
    lp = torch.stack([_query_logprob(probs, i, b.trace) for i, b in enumerate(batch)])
    u = torch.tensor([b.score - 3.0 * b.cost_usd - (token_weight / 50.0) * b.cp_tokens for b in batch],
                     dtype=torch.float32)
    raw = float(u.mean())
    if normalise:
        std = u.std(unbiased=False)
        u = (u - u.mean()) / std if std > 1e-8 else u - u.mean()
    return -(lp * u).mean(), raw


#: objective name -> loss(controller, batch, token_weight, normaliser | flag) -> (loss, mean raw utility)
OBJECTIVES: dict[str, Callable] = {"cp": cp_loss, "no_cp": per_query_loss, "utility": per_query_loss}
