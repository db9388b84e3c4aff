"""The ``--ray [ADDRESS]`` flags shared by ``maslat experiment`` and ``maslat sweep``."""

from __future__ import annotations

import contextlib


def add_ray_args(p, *, required: bool = False) -> None:
    g = p.add_argument_group("Ray (pip install 'maslatency[ray]')")
    if not required:
        g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                       help="run the trials (seeds x regimes x methods) as Ray tasks: on a local cluster started "
                            "here (no ADDRESS), or on the cluster at ADDRESS ('auto', 'ray://host:10001'); "
                            "same results as the serial run")
    else:
        g.add_argument("--ray", nargs="?", const="local", default="local", metavar="ADDRESS",
                       help="Ray cluster address (default: a local cluster started here)")
    g.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray cluster (default: all)")
    g.add_argument("--ray-retries", type=int, default=2,
                   help="resubmissions of a failed trial before the command fails naming it (default 2)")


@contextlib.contextmanager
def ray_map_from_args(args, desc: str):
    """Yields a ``RayMap`` when ``--ray`` was given (stopped on exit if started here), else ``None``."""
    if getattr(args, "ray", None) is None:
        yield None
        return
    from maslat.ray_runner import RayMap, import_ray

    try:
        import_ray()
    except ImportError as e:  # the command line reports ValueErrors as a message, not a traceback
        raise ValueError(str(e)) from e
    address = None if args.ray == "local" else args.ray
    with RayMap(address=address, num_cpus=args.ray_cpus, max_retries=args.ray_retries, desc=desc) as m:
        yield m
