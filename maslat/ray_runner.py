"""Run independent trials (seed x regime x task, sweep points) serially or as Ray tasks, with the same results.

The experiments in ``agents/`` take a ``map_fn(fn, items) -> list`` that applies a pure function to each
trial description and returns the results in order. ``serial_map`` is the plain loop; ``RayMap`` submits
every trial as a Ray task, shows a progress bar over trials, resubmits a failed trial up to
``max_retries`` times and raises ``TrialsFailed`` (naming every failed trial and its last error) when one
still fails: a trial is never silently dropped. Because each trial seeds itself from its description and
torch runs with one thread in every worker (as the serial command does), the results are bit-identical to
the serial run.

Ray is imported only when a ``RayMap`` is used (``import maslat.ray_runner`` does not import it); without it
the error names ``pip install 'maslatency[ray]'``.

    with RayMap(num_cpus=2) as map_fn:          # or RayMap(address="ray://head:10001")
        res = run_experiment("gsm8k", [0, 1, 2], ["lamas", "maas"], map_fn=map_fn)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RAY_INSTALL_HINT", "RayMap", "TrialFailure", "TrialsFailed", "import_ray", "serial_map"]

RAY_INSTALL_HINT = "pip install 'maslatency[ray]'"


def import_ray():
    """``import ray``, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError as e:
        raise ImportError(f"Ray is not installed: {RAY_INSTALL_HINT} (needed by --ray, `maslat sweep` and the "
                          f"RLlib example; {e})") from e
    return ray


def serial_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """The reference: ``[fn(x) for x in items]``."""
    return [fn(x) for x in items]


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialFailure:
    """A trial that raised: its index and description, the attempt (1-based) and the error text."""

    index: int
    item: str
    attempt: int
    error: str


class TrialsFailed(RuntimeError):
    """Some trials still failed after every retry; ``failures`` lists each attempt that raised."""

    def __init__(self, failed: list[int], failures: list[TrialFailure], attempts: int):
        self.failed, self.failures = failed, failures
        last = {f.index: f for f in failures}
        lines = [f"  trial {i} ({last[i].item}): {last[i].error}" for i in failed]
        super().__init__(f"{len(failed)} trial(s) failed after {attempts} attempt(s) each:\n" + "\n".join(lines))


def _call_one_thread(fn: Callable[[Any], Any], item: Any) -> Any:
    """Run ``fn(item)`` in a worker with torch on one thread, as the serial commands run it, so float
    reductions (and so trained weights) are the same bit for bit."""
    import torch

    torch.set_num_threads(1)
    return fn(item)


@dataclass(slots=True, kw_only=True)
class RayMap:
    """A ``map_fn`` that runs trials as Ray tasks.

    Attributes:
        address: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None`` starts a
            local one with ``num_cpus`` CPUs and stops it on ``close()``.
        num_cpus: CPUs of the local cluster (``None``: all of this machine's).
        max_retries: resubmissions of a trial that raised or whose worker died, before it counts as failed.
        progress: show a progress bar over trials (tqdm, on stderr).
        desc: the bar's label.
    """

    address: str | None = None
    num_cpus: int | None = None
    max_retries: int = 2
    progress: bool = True
    desc: str = "trials"
    failures: list[TrialFailure] = field(default_factory=list)
    _started: bool = False

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"num_cpus must be >= 1 or None, got {self.num_cpus}")

    def start(self) -> RayMap:
        """Connect to ``address`` or start a local cluster (reused if this process already has one)."""
        ray = import_ray()
        if not ray.is_initialized():
            kw: dict[str, Any] = {"address": self.address, "include_dashboard": False, "log_to_driver": True}
            if self.address is None:
                kw["num_cpus"] = self.num_cpus
                # local workers import this checkout as the driver does (a cluster needs maslatency installed)
                path = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
                kw["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
            try:
                ray.init(**kw)
            except Exception as e:
                where = f"the cluster at {self.address}" if self.address else "a local Ray cluster"
                raise RuntimeError(f"could not start or reach {where}: {e}") from e
            self._started = True
        return self

    def close(self) -> None:
        """Stop the local cluster if this object started it."""
        if self._started:
            import_ray().shutdown()
            self._started = False

    def __enter__(self) -> RayMap:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def __call__(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` as Ray tasks, in order; raises ``TrialsFailed`` if any trial fails
        ``max_retries + 1`` times (the others' results are lost with it: a partial table is not a result)."""
        self.start()
        ray = import_ray()
        from tqdm.auto import tqdm

        remote = ray.remote(num_cpus=1, max_retries=0)(_call_one_thread)
        fn_ref = ray.put(fn)
        items = list(items)
        pending = {remote.remote(fn_ref, x): (i, 1) for i, x in enumerate(items)}
        results: dict[int, Any] = {}
        failed: list[int] = []
        with tqdm(total=len(items), desc=self.desc, unit="trial", disable=not self.progress, file=sys.stderr) as bar:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                i, attempt = pending.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                    bar.update(1)
                except Exception as e:  # RayTaskError (the trial raised) or a lost worker
                    self.failures.append(TrialFailure(index=i, item=repr(items[i])[:200], attempt=attempt,
                                                      error=_short(e)))
                    if attempt <= self.max_retries:
                        print(f"trial {i} failed (attempt {attempt}), retrying: {_short(e)}", file=sys.stderr)
                        pending[remote.remote(fn_ref, items[i])] = (i, attempt + 1)
                    else:
                        failed.append(i)
                        bar.update(1)
        if failed:
            raise TrialsFailed(sorted(failed), self.failures, self.max_retries + 1)
        return [results[i] for i in range(len(items))]


def _short(e: BaseException) -> str:
    """The last line of a (possibly remote) traceback: the exception type and message."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
