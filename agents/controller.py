"""The LAMaS/MaAS supernet controller (``models/controller.py``, ``models/utils.py``), in torch.

Per layer l a selector scores every operator j against the query::

    q   = normalise(Linear_384->32(query))
    o_j = normalise(Linear_384->32(op_j))                 layer 0
    o_j = normalise(Linear_768->32([op_j ; op_prev]))     layers 1-3, op_prev = FIRST operator of layer l-1
    p   = softmax_j(q . o_j)                              cosine logits in [-1, 1]

135,424 parameters for 7 operators and 4 layers. Operators are drawn by threshold sampling without
replacement (draw from the renormalised rest, add the drawn operator's original probability, repeat while
the sum is below 0.3), then the layer-0 rules apply. Sampling stays stochastic at test time.

``ControllerPolicy`` wraps it as a ``Policy`` for ``MASLatency-v0`` and records, per episode, what the
trainer needs to recompute log-probabilities with gradients.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from envs.operators import GENERATE_TYPE

from .policies import encode_action

__all__ = ["ControllerPolicy", "Decision", "LAMaSController", "apply_layer0_rules", "threshold_sample"]

LAYER0_EARLYSTOP_PENALTY = -1.5


def _init_linear(lin: torch.nn.Linear, gen: torch.Generator) -> None:
    """PyTorch's default Linear init (uniform +-1/sqrt(fan_in)), drawn from an explicit generator."""
    bound = 1.0 / np.sqrt(lin.in_features)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound, generator=gen)
        lin.bias.uniform_(-bound, bound, generator=gen)


class _Selector(torch.nn.Module):
    def __init__(self, dim: int, hidden: int, first: bool, gen: torch.Generator):
        super().__init__()
        self.first = first
        self.query_encoder = torch.nn.Linear(dim, hidden)
        self.operator_encoder = torch.nn.Linear(dim if first else 2 * dim, hidden)
        _init_linear(self.operator_encoder, gen)
        _init_linear(self.query_encoder, gen)

    def forward(self, query: torch.Tensor, ops: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """Probabilities (B, K) for queries (B, D), operators (K, D) and previous first operators (B, D)."""
        q = F.normalize(self.query_encoder(query), p=2, dim=-1)
        if self.first or prev is None:
            o = F.normalize(self.operator_encoder(ops), p=2, dim=-1).unsqueeze(0).expand(q.shape[0], -1, -1)
        else:
            k = ops.shape[0]
            cat = torch.cat([ops.unsqueeze(0).expand(prev.shape[0], k, -1),
                             prev.unsqueeze(1).expand(-1, k, -1)], dim=-1)
            o = F.normalize(self.operator_encoder(cat), p=2, dim=-1)
        return F.softmax(torch.einsum("bh,bkh->bk", q, o), dim=-1)


class LAMaSController(torch.nn.Module):
    """``num_layers`` selectors over frozen operator embeddings ``op_embeddings`` (K, 384)."""

    def __init__(self, op_embeddings: np.ndarray, *, num_layers: int = 4, hidden: int = 32, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("ops", torch.tensor(np.array(op_embeddings, dtype=np.float32)))
        dim = self.ops.shape[1]
        self.layers = torch.nn.ModuleList([_Selector(dim, hidden, i == 0, gen) for i in range(num_layers)])
        self._cache: list | None = None

    @property
    def num_ops(self) -> int:
        return self.ops.shape[0]

    def probs(self, layer: int, query: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities; ``prev`` holds operator indices (ignored at layer 0)."""
        prev_emb = None if layer == 0 else self.ops[prev]
        return self.layers[layer](query, self.ops, prev_emb)

    # -------------------------------------------------------------- fast acting path (no autograd)
    def refresh(self) -> None:
        """Recompute the numpy copies used for acting; call after every optimiser step."""
        cache = []
        with torch.no_grad():
            for i, sel in enumerate(self.layers):
                wq, bq = sel.query_encoder.weight.numpy().copy(), sel.query_encoder.bias.numpy().copy()
                w, b = sel.operator_encoder.weight.numpy(), sel.operator_encoder.bias.numpy()
                ops = self.ops.numpy()
                if i == 0:
                    o = ops @ w.T + b
                    o = o / np.maximum(np.linalg.norm(o, axis=-1, keepdims=True), 1e-12)
                    cache.append((wq, bq, o[None]))             # (1, K, H): one table
                else:
                    d = ops.shape[1]
                    a, pb = ops @ w[:, :d].T, ops @ w[:, d:].T  # [op_j ; op_prev] split into two products
                    o = a[None, :, :] + pb[:, None, :] + b      # (prev, K, H)
                    o = o / np.maximum(np.linalg.norm(o, axis=-1, keepdims=True), 1e-12)
                    cache.append((wq, bq, o))
        self._cache = cache

    def probs_np(self, layer: int, query: np.ndarray, prev: int) -> np.ndarray:
        if self._cache is None:
            self.refresh()
        wq, bq, table = self._cache[layer]
        q = wq @ query + bq
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        logits = table[0 if layer == 0 else prev] @ q
        e = np.exp(logits - logits.max())
        return e / e.sum()


def threshold_sample(p: np.ndarray, threshold: float, rng: np.random.Generator) -> list[int]:
    """Draw without replacement from the renormalised rest until the drawn original mass reaches ``threshold``."""
    probs = [float(x) for x in p]
    avail = list(range(len(probs)))
    chosen: list[int] = []
    total = 0.0
    while total < threshold and avail:
        r = rng.random() * sum(probs[i] for i in avail)
        k = len(avail) - 1
        acc = 0.0
        for pos, i in enumerate(avail):
            acc += probs[i]
            if r < acc:
                k = pos
                break
        j = avail.pop(k)
        chosen.append(j)
        total += probs[j]
    return chosen


def apply_layer0_rules(selected: list[int], names: tuple[str, ...]) -> tuple[list[int], bool]:
    """LAMaS's layer-0 rules. Returns (operators, stop): EarlyStop drawn -> ``[Generate]`` and stop (the
    -1.5 log-prob constant is the trainer's); no generate-type -> ``[Generate]``; else the first
    generate-type operator moves to the front."""
    gen = names.index("Generate")
    if any(names[i] == "EarlyStop" for i in selected):
        return [gen], True
    if not any(names[i] in GENERATE_TYPE for i in selected):
        return [gen], False
    if names[selected[0]] not in GENERATE_TYPE:
        k = next(i for i, j in enumerate(selected) if names[j] in GENERATE_TYPE)
        selected = [selected[k]] + selected[:k] + selected[k + 1:]
    return selected, False


@dataclass(slots=True)
class Decision:
    layer: int
    prev: int            # index of the previous layer's first operator (K at layer 0)
    selected: list[int]  # after the layer-0 rules, in list order
    penalty: bool        # layer-0 EarlyStop rule applied (-1.5 on MaAS-style log-probs)


@dataclass(slots=True)
class Trace:
    query: np.ndarray
    decisions: list[Decision] = field(default_factory=list)


class ControllerPolicy:
    """Samples architectures with a ``LAMaSController`` and records each episode's decisions."""

    def __init__(self, controller: LAMaSController, names: tuple[str, ...], rng: np.random.Generator, *,
                 threshold: float = 0.3, record: bool = True):
        if len(names) != controller.num_ops:
            raise ValueError(f"{len(names)} operator names for a controller over {controller.num_ops} operators")
        self.controller, self.names, self.rng, self.threshold, self.record = controller, names, rng, threshold, record
        self.traces: dict[int, Trace] = {}

    def act(self, obs: dict, episode: int = 0) -> np.ndarray:
        layer, prev = int(obs["layer"]), int(obs["prev_first"])
        k = len(self.names)
        p = self.controller.probs_np(layer, np.asarray(obs["query"], np.float32), prev)
        sel = threshold_sample(p, self.threshold, self.rng)
        stop = penalty = False
        if layer == 0:
            sel, penalty = apply_layer0_rules(sel, self.names)
            stop = penalty
        if self.record:
            if layer == 0:   # a new attempt: LAMaS's retry resamples the whole architecture
                self.traces[episode] = Trace(np.asarray(obs["query"], np.float32))
            self.traces[episode].decisions.append(Decision(layer, prev, list(sel), penalty))
        ops = sel + ([self.names.index("EarlyStop")] if stop else [])
        return encode_action(ops, k)

    def pop(self, episode: int) -> Trace:
        return self.traces.pop(episode)
