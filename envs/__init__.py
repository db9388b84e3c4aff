"""Gymnasium environments and task models. Importing registers ``MASLatency-v0`` (and nothing else happens).

    import gymnasium as gym, envs
    env = gym.make("MASLatency-v0", task="gsm8k", split="train")
    # or, without importing first:  gym.make("envs:MASLatency-v0")
"""

import gymnasium

from .cluster import AZURE_CONV, BackgroundTrace, ClusterConfig
from .mas_latency import MASLatencyEnv
from .operators import OPERATOR_NAMES, operator_embeddings, operator_set
from .supernet import GraphConfig, QueryRun
from .tasks import TASKS, TaskSpec, make_queries, make_task

__all__ = ["AZURE_CONV", "BackgroundTrace", "ClusterConfig", "GraphConfig", "MASLatencyEnv", "OPERATOR_NAMES",
           "QueryRun", "TASKS", "TaskSpec", "make_queries", "make_task", "operator_embeddings", "operator_set"]

if "MASLatency-v0" not in gymnasium.registry:
    gymnasium.register(id="MASLatency-v0", entry_point="envs.mas_latency:MASLatencyEnv")
