"""Learning on a small case whose optimum is known: with a heavy latency price and an accuracy that barely
depends on the architecture (GSM8K's calibrated model), the best supernet is the shortest one. LAMaS's
trainer must move towards it and beat the untrained supernet and the full parallel supernet on the
objective it optimises."""

import numpy as np
import torch

from agents.lamas import Args, make_policy, new_controller, train
from agents.policies import make_static
from envs import ClusterConfig, MASLatencyEnv

LAMBDA = 0.1          # 2e-3 utility per CP token: a 600-token path costs 1.2, more than any score gain
QUERIES = list(range(24))


def _utility(policy, seed=11):
    env = MASLatencyEnv("gsm8k", "train", cluster=ClusterConfig(background_rate_per_s=1.0))
    env.reset(seed=seed)
    infos = env.rollout(policy, QUERIES * 3, concurrency=4)
    u = [i["score"] - 3 * i["cost_usd"] - LAMBDA / 50 * i["cp_tokens"] for i in infos]
    return float(np.mean(u)), float(np.mean([i["cp_tokens"] for i in infos]))


def test_lamas_learns_the_short_supernet():
    torch.set_num_threads(1)
    args = Args(method="lamas", task="gsm8k", seed=0, token_weight=LAMBDA, epochs=20, max_train_queries=len(QUERIES),
                cluster=ClusterConfig(background_rate_per_s=1.0))
    trained = train(args)
    assert len(trained.metrics) == 20 * len(QUERIES) // 4
    u_trained, cp_trained = _utility(make_policy(args, trained.controller, record=False, stream=5))
    untrained = new_controller(args)
    u_init, cp_init = _utility(make_policy(args, untrained, record=False, stream=5))
    u_full, cp_full = _utility(make_static("all_parallel", "math"))
    assert cp_trained < 0.95 * cp_init and cp_trained < cp_full
    assert u_trained > u_init + 0.1
    assert u_trained > u_full


def test_experiment_is_reproducible_and_paired():
    from agents.experiment import run_experiment

    torch.set_num_threads(1)
    a = run_experiment("humaneval", [0], ["lamas", "maas", "single_cot"], epochs=1).to_json()
    b = run_experiment("humaneval", [0], ["lamas", "maas", "single_cot"], epochs=1).to_json()
    assert a == b
    assert set(a["methods"]) == {"lamas", "maas", "single_cot"} and a["seeds"] == 1
