"""maslatency's discrete-event model of vLLM-v1-like GPU serving replicas.

Imports nothing of ours and nothing heavier than numpy and simpy.
"""

from .config import EngineConfig, HardwareSpec, ModelSpec, Overheads, ParallelConfig
from .engine import EngineCore
from .latency import STEP_TIME_MODELS, PhysicsCoefficients, PhysicsStepModel, make_step_time_model
from .profiles import Profile, ProfileError, list_profiles, load_profile, profile_from_dict
from .request import RejectReason, Request, RequestRecord, RequestStatus
from .routing import ROUTERS
from .steps import StepRecord
from .timebase import TICKS_PER_S, ticks_to_s
from .workload import (
    EmpiricalLengths,
    FixedLengths,
    GammaArrivals,
    LognormalLengths,
    PoissonArrivals,
    TraceArrivals,
    Workload,
)
from .world import PoolSpec, Replica, SimEnv, World, make_world

__all__ = [
    "EmpiricalLengths", "EngineConfig", "EngineCore", "FixedLengths", "GammaArrivals", "HardwareSpec",
    "LognormalLengths", "ModelSpec", "Overheads", "ParallelConfig", "PhysicsCoefficients", "PhysicsStepModel",
    "PoissonArrivals", "PoolSpec", "Profile", "ProfileError", "ROUTERS", "RejectReason", "Replica", "Request",
    "RequestRecord", "RequestStatus", "STEP_TIME_MODELS", "SimEnv", "StepRecord", "TICKS_PER_S", "TraceArrivals", "Workload",
    "World", "list_profiles", "load_profile", "make_step_time_model", "make_world", "profile_from_dict",
    "ticks_to_s",
]
