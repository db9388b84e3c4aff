"""Train the two-stage design's estimators, F_lat and F_len, on a Phase-2 dataset
(docs/system_aware.md#4-estimators).

Reads the dataset of ``envs.cmdp_dataset`` (or a live ``maslat collect --phase2`` run plus its Phase-1
file), holds out whole Phase-1 prompts (a prompt in the test split is never seen in training), trains two
small MLPs on log targets and exports them to the numpy bundle that ``envs.estimators`` loads. Reported on
the held-out prompts: MAPE of TTFT, TPOT, output tokens and of the total latency
``T = t_ttft + L_out * t_tpot`` (against the measured ``ttft + (n - 1) * tpot``), per background
concurrency too, and the calibration of the total-latency prediction: the share of calls that finished
within their prediction, the ratio of mean measured to mean predicted, the least-squares slope of
measured on predicted, and a reliability table by decile of the prediction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import torch

from envs.cmdp_catalog import ROLE_NAMES, STRATEGY_NAMES
from envs.embeddings import text_embedding
from envs.estimators import lat_features, len_features
from envs.tasks import make_queries, make_task

__all__ = ["EstimatorArgs", "train_estimators"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EstimatorArgs:
    """Attributes:
        hidden: width of the two hidden layers of each MLP.
        steps: Adam steps per estimator (minibatches drawn in seeded epochs).
        batch_size: rows per Adam step.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (the 384-d prompt embedding invites overfitting).
        test_fraction: share of Phase-1 prompts held out.
        seed: split, initialisation and batch order.
    """

    hidden: int = 64
    steps: int = 4000
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    test_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.hidden < 1 or self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError("hidden, steps and batch_size must be >= 1 and lr > 0")
        if not 0 < self.test_fraction < 1:
            raise ValueError("test_fraction must be in (0, 1)")


def _net(n_in: int, n_out: int, hidden: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                               torch.nn.ReLU(), torch.nn.Linear(hidden, n_out))


def _fit(x: np.ndarray, y: np.ndarray, mask: np.ndarray, a: EstimatorArgs, gen: torch.Generator) -> dict:
    """Masked MSE on standardised targets; returns the exported arrays (``w0.., b0.., x_/y_ mean, std``)."""
    xm, xs = x.mean(0), x.std(0)
    xs[xs < 1e-8] = 1.0
    ym = np.array([y[mask[:, j], j].mean() for j in range(y.shape[1])])
    ys = np.array([max(y[mask[:, j], j].std(), 1e-8) for j in range(y.shape[1])])
    X = torch.as_tensor((x - xm) / xs, dtype=torch.float32)
    Y = torch.as_tensor((y - ym) / ys, dtype=torch.float32)
    M = torch.as_tensor(mask, dtype=torch.float32)
    net = _net(x.shape[1], y.shape[1], a.hidden)
    with torch.no_grad():
        for m in net:    # PyTorch's default init (uniform +-1/sqrt(fan_in)), from the explicit generator
            if isinstance(m, torch.nn.Linear):
                bound = 1.0 / np.sqrt(m.in_features)
                m.weight.uniform_(-bound, bound, generator=gen)
                m.bias.uniform_(-bound, bound, generator=gen)
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    n, step = len(X), 0
    while step < a.steps:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n, a.batch_size):
            b = perm[i:i + a.batch_size]
            err = (net(X[b]) - Y[b]) ** 2 * M[b]
            loss = err.sum() / M[b].sum().clamp(min=1.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step >= a.steps:
                break
    # Duan's smearing: exp of a log-scale prediction is a median; shift so exp() predicts the mean
    with torch.no_grad():
        res = (net(X) - Y).numpy() * ys
    smear = np.array([np.log(np.mean(np.exp(res[mask[:, j], j]))) for j in range(y.shape[1])])
    lin = [m for m in net if isinstance(m, torch.nn.Linear)]
    out = {f"w{i}": m.weight.detach().numpy().T.astype(np.float64) for i, m in enumerate(lin)}
    out.update({f"b{i}": m.bias.detach().numpy().astype(np.float64) for i, m in enumerate(lin)})
    out.update(x_mean=xm, x_std=xs, y_mean=ym + smear, y_std=ys, x_min=x.min(0), x_max=x.max(0))
    return out


def _predict(net: dict, x: np.ndarray) -> np.ndarray:
    h = (np.clip(x, net["x_min"], net["x_max"]) - net["x_mean"]) / net["x_std"]
    n = sum(1 for k in net if k.startswith("w"))
    for i in range(n):
        h = h @ net[f"w{i}"] + net[f"b{i}"]
        if i < n - 1:
            h = np.maximum(h, 0.0)
    return h * net["y_std"] + net["y_mean"]


def _embeddings(aux: pd.DataFrame, dataset_seed: int, prompts: list[str] | None = None) -> np.ndarray:
    """h_prompt of each row: the query embedding of a simulated prompt (its task and query are known), or a
    hashed text embedding of a live prompt (``prompts[prompt_row]``)."""
    out = np.zeros((len(aux), 384))
    sim_rows = aux["query"].to_numpy() >= 0
    for task, idx in aux[sim_rows].groupby("task").indices.items():
        rows = np.flatnonzero(sim_rows)[idx]
        qs = make_queries(make_task(task), "train", dataset_seed)
        out[rows] = qs.embedding[aux["query"].to_numpy()[rows]]
    live = np.flatnonzero(~sim_rows)
    if len(live):
        if prompts is None:
            raise ValueError("rows without a simulated query need the Phase-1 prompt texts (the prompts file)")
        cache = {}
        for i in live:
            r = int(aux.prompt_row.iat[i])
            if r not in cache:
                cache[r] = text_embedding(prompts[r])
            out[i] = cache[r]
    return out


def _mape(pred: np.ndarray, true: np.ndarray) -> float:
    ok = true > 0
    return float(100.0 * np.mean(np.abs(pred[ok] - true[ok]) / true[ok]))


def _calibration(pred: np.ndarray, true: np.ndarray) -> dict:
    order = np.argsort(pred)
    deciles = []
    for chunk in np.array_split(order, 10):
        if len(chunk):
            deciles.append({"predicted_s": float(pred[chunk].mean()), "measured_s": float(true[chunk].mean())})
    slope = float(np.dot(pred, true) / np.dot(pred, pred))
    return {"within_prediction": float(np.mean(true <= pred)), "measured_over_predicted": float(true.mean() / pred.mean()),
            "slope": slope, "deciles": deciles}


def train_estimators(p2: pd.DataFrame, aux: pd.DataFrame, models: tuple[str, ...], args: EstimatorArgs = EstimatorArgs(),
                     *, dataset_seed: int = 0, prompt_texts: list[str] | None = None) -> tuple[dict, dict]:
    """Fit F_lat and F_len; returns (nets for ``envs.estimators.save_bundle``, metrics). ``prompt_texts`` (the
    Phase-1 texts) is needed for rows of a live run, whose prompts are embedded from their text."""
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    mid = p2.model_id.map({m: i for i, m in enumerate(models)})
    if mid.isna().any():
        raise ValueError(f"dataset has models {sorted(set(p2.model_id))}, the estimator is for {list(models)}")
    mid = mid.to_numpy(np.int64)
    rid = p2.role_id.map({r: i for i, r in enumerate(ROLE_NAMES)})
    if rid.isna().any():
        raise ValueError(f"unknown role ids {sorted(set(p2.role_id[rid.isna()]))}; roles: {list(ROLE_NAMES)}")
    rid = rid.to_numpy(np.int64)
    sid = p2.strategy_id.map({s: i for i, s in enumerate(STRATEGY_NAMES)}).to_numpy(np.int64)
    system = np.column_stack([p2.queue_waiting, p2.queue_running, p2.kv_utilization.fillna(0.0), aux.ttft_ema_ms])
    lin = p2.total_input_tokens.to_numpy(np.float64)
    n_out = p2.output_tokens.to_numpy(np.float64)
    ttft_s, tpot_s = p2.actual_ttft.to_numpy() / 1e3, p2.actual_tpot.to_numpy() / 1e3
    # hold out whole Phase-1 prompts
    prompts = np.unique(aux.prompt_row)
    rng = np.random.Generator(np.random.PCG64(args.seed))
    test_p = rng.choice(prompts, max(1, int(round(args.test_fraction * len(prompts)))), replace=False)
    test = np.isin(aux.prompt_row.to_numpy(), test_p)
    tr = ~test
    xl = lat_features(system, rid, lin, mid, len(models))
    yl = np.column_stack([np.log(np.maximum(ttft_s, 1e-6)), np.log(np.maximum(tpot_s, 1e-6))])
    ml = np.column_stack([np.ones(len(p2), bool), n_out > 1])
    emb = _embeddings(aux, dataset_seed, prompt_texts)
    xn = len_features(emb, rid, sid, mid, lin, len(models))
    yn = np.log(n_out)[:, None]
    lat = _fit(xl[tr], yl[tr], ml[tr], args, gen)
    length = _fit(xn[tr], yn[tr], np.ones((tr.sum(), 1), bool), args, gen)
    # held-out evaluation
    pl = np.exp(_predict(lat, xl[test]))
    pn = np.exp(_predict(length, xn[test]))[:, 0]
    t_true = ttft_s[test] + np.maximum(n_out[test] - 1, 0) * tpot_s[test]
    t_pred = pl[:, 0] + pn * pl[:, 1]
    dec = n_out[test] > 1
    metrics = {
        "rows": int(len(p2)), "train_rows": int(tr.sum()), "test_rows": int(test.sum()),
        "prompts": int(len(prompts)), "test_prompts": int(len(test_p)),
        "mape_pct": {"ttft": _mape(pl[:, 0], ttft_s[test]), "tpot": _mape(pl[dec, 1], tpot_s[test][dec]),
                     "output_tokens": _mape(pn, n_out[test]), "total_latency": _mape(t_pred, t_true)},
        "mape_pct_by_concurrency": {},
        "calibration": _calibration(t_pred, t_true),
        "args": asdict(args),
    }
    conc = aux.concurrency.to_numpy()[test]
    for c in np.unique(conc):
        k = conc == c
        metrics["mape_pct_by_concurrency"][str(int(c))] = {
            "ttft": _mape(pl[k, 0], ttft_s[test][k]), "total_latency": _mape(t_pred[k], t_true[k])}
    return {"lat": lat, "len": length}, metrics
