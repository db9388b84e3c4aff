"""The two-stage design's supervised estimators at inference time: ``F_lat`` and ``F_len``
(docs/system_aware.md#4-estimators).

* ``F_lat`` (MLP), per candidate model: ``[q_wait, q_run, u_kv, ttft_ema_ms, log(1 + L_in), e_role, e_model]``
  -> ``(log TTFT, log TPOT)``.
* ``F_len`` (MLP): ``[h_prompt, log(1 + L_in), e_role, e_strat, e_model]`` -> ``log L_out``.

Embeddings of role, strategy and model are one-hot inputs to the first layer (a learned embedding by
another name). Queue lengths are pool totals (vLLM's gauges summed over a pool's engines, as the collector
records them); ``u_kv`` and the TTFT EMA are pool means. The environment combines the outputs as the seed
does: ``T_total(m, rho) = t_ttft + L_out(rho) * t_tpot`` (vLLM's exact decode time is ``(L_out - 1) * TPOT``;
the difference is one TPOT, negligible except for Flash answers of a few tokens).

Training lives in ``agents.estimators`` (torch); the trained weights are exported to a small ``.npz``
bundle that this module runs in numpy, so the environment never imports torch. The default bundle
(``envs/data/estimators.npz``) was produced by ``maslat train estimators`` on the simulated two-phase
dataset; its metadata records the command, the dataset and the held-out errors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from .cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES

__all__ = ["DEFAULT_BUNDLE", "Estimator", "MLPEstimator", "NullEstimator", "lat_features", "len_features",
           "load_estimator", "save_bundle"]

NUM_SYSTEM = 4          # waiting, running, kv usage, ttft ema (ms)


def default_bundle_path() -> Path:
    return Path(str(resources.files("envs") / "data" / "estimators.npz"))


DEFAULT_BUNDLE = "default"


def lat_features(system: np.ndarray, role_id: np.ndarray, prompt_tokens: np.ndarray, model_id: np.ndarray,
                 num_models: int) -> np.ndarray:
    """Rows of F_lat inputs. ``system``: (n, 4) = waiting, running, kv usage, ttft ema in ms."""
    n = len(role_id)
    x = np.zeros((n, NUM_SYSTEM + 1 + len(ROLE_NAMES) + num_models))
    x[:, :NUM_SYSTEM] = np.nan_to_num(system, nan=0.0)
    x[:, NUM_SYSTEM] = np.log1p(prompt_tokens)
    x[np.arange(n), NUM_SYSTEM + 1 + role_id] = 1.0
    x[np.arange(n), NUM_SYSTEM + 1 + len(ROLE_NAMES) + model_id] = 1.0
    return x


def len_features(embedding: np.ndarray, role_id: np.ndarray, strategy_id: np.ndarray, model_id: np.ndarray,
                 prompt_tokens: np.ndarray, num_models: int) -> np.ndarray:
    """Rows of F_len inputs; ``embedding`` (n, d) is the prompt's embedding (here: its query's)."""
    n, d = embedding.shape
    r, s = len(ROLE_NAMES), len(STRATEGY_NAMES)
    x = np.zeros((n, d + 1 + r + s + num_models))
    x[:, :d] = embedding
    x[:, d] = np.log1p(prompt_tokens)
    x[np.arange(n), d + 1 + role_id] = 1.0
    x[np.arange(n), d + 1 + r + strategy_id] = 1.0
    x[np.arange(n), d + 1 + r + s + model_id] = 1.0
    return x


class Estimator(Protocol):
    model_names: tuple[str, ...]

    def predict(self, system: np.ndarray, role_id: int, prompt_tokens: np.ndarray,
                embedding: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(TTFT s, TPOT s, output tokens), each (models, strategies), for one agent call.

        ``system``: (models, 4); ``prompt_tokens``: (models, strategies)."""
        ...


@dataclass(frozen=True, slots=True)
class _MLP:
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    x_mean: np.ndarray
    x_std: np.ndarray
    y_mean: np.ndarray
    y_std: np.ndarray
    x_min: np.ndarray
    x_max: np.ndarray

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Inputs are clipped to the training range first: an MLP extrapolates arbitrarily (a queue deeper
        than any in the dataset is read as the deepest one seen)."""
        h = (np.clip(x, self.x_min, self.x_max) - self.x_mean) / self.x_std
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                np.maximum(h, 0.0, out=h)
        return h * self.y_std + self.y_mean


def _mlp_from(arrs, prefix: str) -> _MLP:
    n = int(arrs[f"{prefix}/layers"])
    return _MLP(tuple(arrs[f"{prefix}/w{i}"] for i in range(n)), tuple(arrs[f"{prefix}/b{i}"] for i in range(n)),
                arrs[f"{prefix}/x_mean"], arrs[f"{prefix}/x_std"], arrs[f"{prefix}/y_mean"], arrs[f"{prefix}/y_std"],
                arrs[f"{prefix}/x_min"], arrs[f"{prefix}/x_max"])


class MLPEstimator:
    """F_lat and F_len loaded from a bundle (see ``save_bundle``)."""

    def __init__(self, lat: _MLP, length: _MLP, meta: dict):
        self.lat, self.len, self.meta = lat, length, meta
        self.model_names = tuple(meta["models"])
        if tuple(meta["roles"]) != ROLE_NAMES or tuple(meta["strategies"]) != STRATEGY_NAMES:
            raise ValueError("estimator bundle was trained with other roles or strategies; retrain it with "
                             "`maslat train estimators`")
        nm, ns = len(self.model_names), len(STRATEGY_NAMES)
        self._m = np.repeat(np.arange(nm), ns)
        self._s = np.tile(np.arange(ns), nm)

    def predict(self, system, role_id, prompt_tokens, embedding):
        nm, ns = len(self.model_names), len(STRATEGY_NAMES)
        k = nm * ns
        roles = np.full(k, role_id)
        lp = prompt_tokens.reshape(-1)
        y = self.lat(lat_features(system[self._m], roles, lp, self._m, nm))
        ln = self.len(len_features(np.broadcast_to(embedding, (k, len(embedding))), roles, self._s, self._m, lp, nm))
        ttft, tpot = np.exp(y[:, 0]).reshape(nm, ns), np.exp(y[:, 1]).reshape(nm, ns)
        return ttft, tpot, np.exp(ln[:, 0]).reshape(nm, ns)


class NullEstimator:
    """No estimates (zeros): for ablations and for tests that do not need them."""

    def __init__(self, model_names: tuple[str, ...]):
        self.model_names = tuple(model_names)
        self.meta = {"kind": "none"}

    def predict(self, system, role_id, prompt_tokens, embedding):
        z = np.zeros((len(self.model_names), len(STRATEGY_NAMES)))
        return z, z, z


def save_bundle(path: str | Path, nets: dict[str, dict[str, np.ndarray]], meta: dict) -> Path:
    """Write ``{"lat": net, "len": net}`` (each: ``w0.., b0.., x_mean, x_std, y_mean, y_std, x_min, x_max``) and
    ``meta``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrs = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for name, net in nets.items():
        n = sum(1 for k in net if k.startswith("w"))
        arrs[f"{name}/layers"] = np.array(n)
        for k, v in net.items():
            arrs[f"{name}/{k}"] = np.asarray(v, dtype=np.float64)
    with path.open("wb") as f:
        np.savez_compressed(f, **arrs)
    return path


def load_estimator(spec, model_names: tuple[str, ...]):
    """``"default"`` (the shipped bundle), a bundle path, ``"none"``, or an object with ``predict``."""
    if spec is None or spec == "none":
        return NullEstimator(model_names)
    if not isinstance(spec, str | Path):
        if not hasattr(spec, "predict"):
            raise ValueError(f"estimator must be 'default', 'none', a bundle path or an object with predict(), got "
                             f"{spec!r}")
        est = spec
    else:
        path = default_bundle_path() if spec == DEFAULT_BUNDLE else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no estimator bundle; train one with `maslat train estimators --out "
                                    f"{path}`")
        with np.load(path, allow_pickle=False) as z:
            arrs = {k: z[k] for k in z.files}
        meta = json.loads(str(arrs["meta"]))
        est = MLPEstimator(_mlp_from(arrs, "lat"), _mlp_from(arrs, "len"), meta)
    if tuple(est.model_names) != tuple(model_names):
        raise ValueError(f"the estimator was trained for models {list(est.model_names)}, the environment has "
                         f"{list(model_names)}: train one for these models with `maslat train estimators`")
    return est
