"""APWA on the simulated cluster: workloads and contracts, the capability registry, the manager, the
executor, the baselines and one run of a method (arXiv 2605.15132; docs/system_aware.md#10-apwa-architecture).

    from envs.apwa import run_method
    r = run_method("apwa", "summarise", num_items=100, seed=0)
    r.makespan_s, r.structural_completeness, r.semantic_utility
"""

from .executor import CallRecord, Executor, RunResult
from .manager import Decomposition, Plan, auto_decomposition, make_plan
from .methods import METHODS
from .registry import Capability, CapabilityRegistry, default_registry
from .workloads import WORKLOADS, DataTable, SubtaskContract, TableMeta, Workload, context_quality, make_table
from .world import APWAConfig, APWARun, apwa_sim_backend, pool_states, run_method, world_preemptions

__all__ = ["METHODS", "WORKLOADS", "APWAConfig", "APWARun", "CallRecord", "Capability",
           "CapabilityRegistry", "DataTable", "Decomposition", "Executor", "Plan", "RunResult", "SubtaskContract",
           "TableMeta", "Workload", "auto_decomposition", "context_quality", "default_registry", "make_plan",
           "make_table", "run_method", "apwa_sim_backend", "pool_states", "world_preemptions"]
