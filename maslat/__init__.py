"""maslatency: the public facade.

    import maslat
    world = maslat.make_world(maslat.PoolSpec(name="llama8b", profile=maslat.load_profile("h100-llama-3.1-8b"),
                                              replicas=2, router="least_outstanding"), seed=0)

Heavier layers (environments, trainers, trace tools) are imported lazily by the command line.
"""

from sim import (
    EngineConfig,
    PoolSpec,
    Profile,
    RequestRecord,
    Workload,
    World,
    list_profiles,
    load_profile,
    make_world,
)

__version__ = "0.1.0"

__all__ = ["EngineConfig", "PoolSpec", "Profile", "RequestRecord", "Workload", "World", "list_profiles",
           "load_profile", "make_world", "__version__"]
