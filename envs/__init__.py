"""Gymnasium environments and task models. Importing registers ``MASLatency-v0``, ``MASLatency-CMDP-v0`` and
``MASLatency-APWA-v0`` (and nothing else happens).

    import gymnasium as gym, envs
    env = gym.make("MASLatency-v0", task="gsm8k", split="train")
    # or, without importing first:  gym.make("envs:MASLatency-v0")

A new environment is a ``envs.decision.DecisionEnv`` subclass (the shared decision skeleton: backend,
suspension, query order, episode keys, final info); its ``info`` dicts are typed in ``envs.infos``.

Reusing the task models (e.g. for a model x strategy router)::

    from envs.tasks import make_task, make_queries, calibrate, success_prob
    from envs.operators import quality, completion_mean_tokens, LENGTHS, PRICES_USD_PER_TOKEN
    spec = make_task("mbpp"); qs = make_queries(spec, "train")       # difficulty, 384-d embedding, prompt tokens
    p = success_prob(calibrate(spec), qs.difficulty, "cot", capability_logit=-1.0)   # a weaker model
    n = completion_mean_tokens("mbpp", "cot", length_scale=0.2)                     # a concise strategy
"""

import gymnasium

from .backend import Backend, SimBackend
from .cluster import AZURE_CONV, BackgroundTrace, ClusterConfig
from .decision import DecisionEnv, Episode
from .mas_latency import MASLatencyEnv
from .operators import OPERATOR_NAMES, operator_embeddings, operator_set
from .supernet import GraphConfig, QueryRun
from .tasks import TASKS, TaskSpec, make_queries, make_task

__all__ = ["AZURE_CONV", "Backend", "BackgroundTrace", "ClusterConfig", "DecisionEnv", "Episode", "GraphConfig",
           "MASLatencyEnv", "OPERATOR_NAMES", "QueryRun", "SimBackend", "TASKS", "TaskSpec", "make_queries", "make_task",
           "operator_embeddings", "operator_set"]

if "MASLatency-v0" not in gymnasium.registry:
    gymnasium.register(id="MASLatency-v0", entry_point="envs.mas_latency:MASLatencyEnv")
if "MASLatency-CMDP-v0" not in gymnasium.registry:
    gymnasium.register(id="MASLatency-CMDP-v0", entry_point="envs.cmdp:MASLatencyCMDPEnv")
if "MASLatency-APWA-v0" not in gymnasium.registry:
    gymnasium.register(id="MASLatency-APWA-v0", entry_point="envs.apwa_env:MASLatencyAPWAEnv")
