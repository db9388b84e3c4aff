"""The ``info`` dicts of the environments, typed: what ``reset`` and ``step`` hand over, key by key.

Every final info carries the keys ``envs.decision.DecisionEnv`` sets (``EpisodeInfo``). ``episode_key`` (not
``episode``: Gymnasium's ``RecordEpisodeStatistics`` and SB3's ``Monitor`` own ``info["episode"]``) is unique
within a world and is what ``rollout`` passes to ``policy.act(obs, episode=key)``.
"""

from typing import NotRequired, TypedDict

import numpy as np

__all__ = ["APWAFinalInfo", "APWAResetInfo", "CMDPCall", "CMDPFinalInfo", "CMDPResetInfo", "CMDPStepInfo", "EpisodeInfo", "MASFinalInfo", "MASLayer",
           "MASResetInfo"]


class EpisodeInfo(TypedDict):
    """Set by the decision skeleton on every final info."""

    query: int            #: the query's index in its split
    visit: int            #: runs of this query in this world before this one
    episode_key: int      #: unique in the world
    start_s: float        #: backend clock at the query's start (s)
    end_s: float          #: backend clock at its answer (s)


# ---------------------------------------------------------------------------------------------- MASLatency-v0
class MASResetInfo(TypedDict):
    query: int
    visit: int


class MASLayer(TypedDict):
    ops: list[str]                      #: the layer's operators, in order
    cp_tokens: list[int]                #: c(op) of each
    op_seconds: list[float]             #: seconds of each
    cp_tokens_layer: int                #: the layer's contribution to cp_tokens
    seconds: float                      #: the layer's wall time (s)
    bottleneck: str | None              #: operator with the most c(op) tokens (ties to the first)
    bottleneck_index: int
    bottleneck_seconds: str | None      #: operator that took longest
    ignored_duplicates: int


class MASFinalInfo(EpisodeInfo):
    """``MASLatency-v0``'s last-step info (``{}`` on the other steps)."""

    score: float
    cp_tokens: int
    cp_tokens_layers: int
    cp_tokens_post: int
    cp_seconds: float
    pre_seconds: float
    post_seconds: float
    cost_usd: float
    cumulative_cost_usd: float
    llm_calls: int
    prompt_tokens: int
    completion_tokens: int
    retries: int
    failed: bool
    num_layers: int
    layers: list[MASLayer]
    clipped_tokens: int
    rejected_calls: int
    generate_first: bool


# ------------------------------------------------------------------------------------------ MASLatency-CMDP-v0
class CMDPResetInfo(TypedDict):
    query: int
    visit: int
    topology: str
    slo_s: float
    slo_factor: float | None
    reference_s: float
    start_s: float


class CMDPCall(TypedDict):
    node: int
    role: str
    model: str
    strategy: str
    prompt_tokens: int
    output_tokens: int
    start_s: float
    latency_s: float
    cost_usd: float
    served: bool
    reject_reason: str | None
    ttft_s: NotRequired[float]
    tpot_s: NotRequired[float]


class CMDPStepInfo(TypedDict):
    """``MASLatency-CMDP-v0``'s info on every step."""

    cost: float                 #: the constraint cost of this step (``env.cost_kind``)
    overrun_step_s: float       #: seconds beyond the SLO since the previous step (the "overrun" cost)
    overrun_s: float            #: seconds beyond the SLO so far
    elapsed_s: float
    slo_s: float
    action: tuple[int, int]     #: (model, strategy) as decoded


class CMDPFinalInfo(CMDPStepInfo, EpisodeInfo):
    """The last step's info: the step's keys and the episode's."""

    quality: float
    quality_expected: float
    quality_by_action: NotRequired[np.ndarray]
    latency_s: float
    slo_factor: float | None
    reference_s: float
    slo_violated: bool
    goodput: float
    cost_usd: float
    topology: str
    num_calls: int
    rejected_calls: int
    calls: list[CMDPCall]
    clipped_tokens: int


# ------------------------------------------------------------------------------------------ MASLatency-APWA-v0
class APWAResetInfo(TypedDict):
    query: int
    visit: int
    items: int                  #: rows in the query's table, N
    workload: str               #: ``envs.apwa.WORKLOADS`` name
    seed: int                   #: the world's seed
    start_s: float


class APWAFinalInfo(EpisodeInfo):
    """``MASLatency-APWA-v0``'s info on its one step."""

    cost: float                     #: seconds beyond ``slo_s`` (0 without an SLO)
    apwa: dict                      #: ``envs.apwa.RunResult.summary()``
    makespan_s: float
    structural_completeness: float
    semantic_utility: float
    tokens: int
    lost_items: int
    width: int
    depth: int
    workload: str
    items: int
    seed: int
    preemptions: int | None         #: world-wide during the query (simulator only, else ``None``)
    kv_peak: float | None           #: highest KV-cache usage of a pool, sampled every 0.5 s (simulator only)
