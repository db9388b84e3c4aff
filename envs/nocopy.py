"""Environments that refuse to be copied or pickled, with a message instead of ``cannot pickle 'generator'``.

A running episode lives inside SimPy processes (Python generators suspended mid-function) and, for live
servers, inside an event loop and open sockets. Python can copy or pickle neither, so ``copy.deepcopy(env)``
and ``pickle.dumps(env)`` used to fail deep inside with ``TypeError: cannot pickle 'generator' object``.
``NotCopyable`` makes both fail at once with what to do instead: build another environment from the same
arguments (``gym.make`` / the constructor) and ``reset(seed=...)`` it; the same seed gives the same episode bit
for bit, which is how a snapshot of a world is reproduced here. Vector environments are unaffected: they
pickle the *factory*, never an environment.
"""

from __future__ import annotations

__all__ = ["NotCopyable"]


class NotCopyable:
    """Mixin: ``copy.copy``, ``copy.deepcopy`` and ``pickle`` raise a ``TypeError`` that says why and what to do."""

    def _no_copy(self, what: str):
        name = type(self).__name__
        raise TypeError(f"{name} cannot be {what}: its simulated world runs as live SimPy processes (suspended "
                        f"generators) that Python cannot copy. Build a new {name} with the same arguments and "
                        f"reset(seed=...) it instead: the same seed replays the same episode bit for bit.")

    def __copy__(self):
        self._no_copy("copied")

    def __deepcopy__(self, memo):
        self._no_copy("deep-copied")

    def __reduce_ex__(self, protocol):
        self._no_copy("pickled")
