"""``sim.SimEnv`` against plain ``simpy.Environment``: the same process model, the same events in the same order.

``SimEnv`` re-implements ``Environment.run`` and ``step`` and writes SimPy's private queue, so a SimPy release
that changes those internals could reorder events silently. The model below exercises what the simulator and
its users rely on: timeouts (ties broken by creation order), events succeeded and failed by other processes,
interrupts, sub-processes and their return values, condition events (``|``, ``&``), a ``Resource`` and a
``Store``, ``run(until=number)``, ``run(until=event)``, ``step()`` and ``peek()``, and plain callbacks at absolute
times (``SimEnv.call_at``; under plain SimPy a pre-triggered event with that one callback, which is what it
replaces). Times are binary fractions, so "at t" and "after t - now" are the same instant in both.
"""

import pytest
import simpy
from simpy.events import NORMAL

import sim.simenv
from sim.world import SIMPY_TESTED, SimEnv, check_simpy_version


def _call_at(env, t, fn):
    if isinstance(env, SimEnv):
        env.call_at(t, fn)
    else:  # what call_at stands for
        ev = simpy.Event(env)
        ev._ok, ev._value = True, None
        ev.callbacks.append(fn)
        env.schedule(ev, NORMAL, t - env.now)


def _model(env, log):
    def note(what):
        log.append((env.now, what))

    signal, doomed = env.event(), env.event()
    res, store = simpy.Resource(env, capacity=1), simpy.Store(env, capacity=2)

    def ticker(name, gaps):
        for g in gaps:
            yield env.timeout(g)
            note(f"{name} tick")

    def waiter():
        v = yield signal
        note(f"signal {v}")
        try:
            yield doomed
        except ValueError as e:
            note(f"doomed failed: {e}")

    def trigger():
        yield env.timeout(3)
        signal.succeed("go")
        note("signalled")
        yield env.timeout(0.5)
        doomed.fail(ValueError("boom"))

    def sleeper():
        try:
            yield env.timeout(100)
            note("slept through")
        except simpy.Interrupt as i:
            note(f"interrupted by {i.cause}")
        r = yield env.process(child(7))
        note(f"child returned {r}")

    def child(x):
        yield env.timeout(0.25)
        note("child ran")
        return 2 * x

    def interrupter(victim):
        yield env.timeout(4)
        victim.interrupt("interrupter")
        note("interrupt sent")

    def user(name, hold):
        with res.request() as req:
            yield req
            note(f"{name} holds")
            yield env.timeout(hold)
        note(f"{name} released")

    def producer():
        for i in range(5):
            yield store.put(i)
            note(f"put {i}")
            yield env.timeout(0.5)

    def consumer():
        yield env.timeout(1)
        for _ in range(5):
            item = yield store.get()
            note(f"got {item}")
            yield env.timeout(1.25)

    def conditions():
        a, b = env.timeout(1, "a"), env.timeout(2, "b")
        got = yield a | b
        note(f"any {sorted(got.values())}")
        got = yield env.timeout(1, "c") & env.timeout(1.5, "d")
        note(f"all {sorted(got.values())}")

    for name, gaps in (("x", [1, 1, 1, 2]), ("y", [1, 2, 0, 2]), ("z", [0.5, 0.5, 3])):
        env.process(ticker(name, gaps))
    env.process(waiter())
    env.process(trigger())
    env.process(interrupter(env.process(sleeper())))
    for name, hold in (("u1", 1.5), ("u2", 0.5), ("u3", 1)):
        env.process(user(name, hold))
    env.process(producer())
    env.process(consumer())
    env.process(conditions())
    for t in (2.0, 2.0, 4.5, 9.0):
        _call_at(env, t, lambda _e, t=t: note(f"callback {t}"))


def _drive(env_cls):
    env = env_cls()
    log = []
    _model(env, log)
    for _ in range(5):  # a few single steps first
        log.append(("peek", env.peek()))
        env.step()
    env.run(until=2.75)
    log.append(("now", env.now))
    stop = env.timeout(3, value="stop value")
    log.append(("until event", env.run(until=stop)))
    env.run()
    log.append(("end", env.now))
    with pytest.raises(simpy.core.EmptySchedule):
        env.step()
    return log


def test_simenv_runs_a_process_model_exactly_like_simpy():
    plain, ours = _drive(simpy.Environment), _drive(SimEnv)
    assert ours == plain
    assert len(plain) == 48 and plain[-1] == ("end", 100)  # the interrupted sleeper's timeout still fires
    assert any(w == "interrupted by interrupter" for _, w in plain)
    assert any(w == "doomed failed: boom" for _, w in plain)


def test_simenv_until_in_the_past_and_unreached_event_fail_like_simpy():
    for cls in (simpy.Environment, SimEnv):
        env = cls()
        env.run(until=1)
        with pytest.raises(ValueError, match="must be greater"):
            env.run(until=0.5)
        with pytest.raises(RuntimeError, match="No scheduled events left"):
            env.run(until=env.event())


def test_untested_simpy_version_fails_loudly(monkeypatch):
    (lo_maj, lo_min), (hi_maj, hi_min) = SIMPY_TESTED
    check_simpy_version(simpy.__version__)  # the installed one is a tested one
    check_simpy_version(f"{lo_maj}.{lo_min}.0")
    for bad in (f"{hi_maj}.{hi_min}.0", f"{lo_maj}.{lo_min - 1}.9", "5.0", "garbage"):
        with pytest.raises(RuntimeError, match=rf"simpy >={lo_maj}\.{lo_min},<{hi_maj}\.{hi_min}"):
            check_simpy_version(bad)
    monkeypatch.setattr(simpy, "__version__", "9.0.0")
    monkeypatch.setattr(sim.simenv, "_simpy_checked", False)
    with pytest.raises(RuntimeError, match="simpy 9.0.0 is installed"):
        SimEnv()
