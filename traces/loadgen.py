"""The collector's main loop: discover the server, then open-loop (Poisson or trace) or closed-loop load.

::

    discover (/v1/models, /version, first scrape -> model, max_model_len, time scale, cache config)
       |
    meta.json (complete: false) ---- scrape_loop: one timeseries row per interval -----------------+
       |                                                                                          |
    load: open loop  -> one task per arrival, sent at its time                                    |
          closed loop -> N clients, each sends its next request when the last one ends            |
       |  (Ctrl-C sets stop: no new request; tasks in flight are cancelled and recorded as failed)|
    drain in-flight requests -> one last scrape at the next tick --------------------------------+
       |
    meta.json (complete: true | interrupted: true), requests.jsonl sorted by request id
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools

from .runwriter import RunWriter

__all__ = ["load_description", "run_collection"]


def load_description(cfg) -> dict:
    if cfg.phase2 is not None:
        mode = {"mode": "phase2", "background_concurrency": cfg.concurrency or 0}
    elif cfg.trace_arrivals:
        mode = {"mode": "trace"}
    elif cfg.concurrency is not None:
        mode = {"mode": "concurrency", "concurrency": cfg.concurrency}
    else:
        mode = {"mode": "poisson", "rate_per_s": cfg.rate_per_s}
    return {**mode, "workload": cfg.workload, "num_requests": cfg.num_requests, "duration_s": cfg.duration_s}


def _more(col, i: int) -> bool:
    cfg = col.cfg
    if col.stop.is_set():
        return False
    if cfg.num_requests is not None and i >= cfg.num_requests:
        return False
    if col.plan.size is not None and i >= col.plan.size:
        return False
    return True


def _take(col, i: int) -> tuple[str, dict] | None:
    """The i-th planned request as (url, body), or None if it cannot fit the model (counted)."""
    p, o = col.plan.lengths(i)
    if col.oversize(p, o):
        col.skipped += 1
        return None
    return col.body(p, o)


async def _open_loop(col, session) -> None:
    cfg, plan, clock = col.cfg, col.plan, col.clock
    gaps = None if cfg.trace_arrivals else plan.poisson_gaps(cfg.rate_per_s)
    t = 0.0
    for i in itertools.count():
        if not _more(col, i):
            return
        t = plan.arrival_offset(i) if cfg.trace_arrivals else t + next(gaps)
        if cfg.duration_s is not None and t > cfg.duration_s:
            return
        delay = (t - clock.elapsed()) * clock.time_scale
        if delay > 0:
            await col.pause(delay)
        if col.stop.is_set():
            return
        req = _take(col, i)
        if req is not None:
            col.spawn(col.send(session, *req))


async def _closed_loop(col, session) -> None:
    cfg, clock = col.cfg, col.clock
    counter = itertools.count()

    async def client() -> None:
        while True:
            i = next(counter)
            if not _more(col, i) or (cfg.duration_s is not None and clock.elapsed() > cfg.duration_s):
                return
            req = _take(col, i)
            if req is None:
                continue
            res = await col.send(session, *req)
            if res.status is None and res.error and not col.stop.is_set():
                await col.pause(cfg.retry_backoff_s)  # the server is unreachable: do not spin

    for _ in range(cfg.concurrency):
        col.spawn(client())


async def drain(col) -> None:
    """Wait for every task in flight, or for ``stop``."""
    stop = asyncio.create_task(col.stop.wait())
    try:
        while col.inflight and not col.stop.is_set():
            await asyncio.wait(set(col.inflight) | {stop}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()


async def run_collection(col) -> dict:
    """Drive one ``traces.collect.Collector`` to the end (or to ``stop``); return its summary."""
    import aiohttp

    cfg = col.cfg
    from .client import auth_headers

    headers = auth_headers(cfg.api_key)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=headers) as s:
        await col.discover(s)
    started = col.clock.epoch()
    col.writer = RunWriter(cfg.out_dir, meta=col.meta(started=started, finished=None, complete=False),
                           overwrite=cfg.overwrite)
    timeout = aiohttp.ClientTimeout(total=cfg.request_timeout_s * col.clock.time_scale, sock_connect=10)
    with quiet_gc():
        return await _collect(col, cfg, headers, timeout, started)


#: while collecting, the cyclic garbage collector runs only from the scrape loop, once per this many seconds
#: (``quiet_gc``)
GC_EVERY_S = 120.0


@contextlib.contextmanager
def quiet_gc():
    """No automatic cyclic garbage collection while the requests stream (one ``gc.collect()`` per ``GC_EVERY_S`` from the
    scrape loop instead), and what was allocated before it frozen out of every collection.

    Measured against the real vLLM CPU engine (``--rate 1.5 --num-requests 60 --workload lognormal:400,80 --seed 21``,
    1-s scrapes, 2 cores): with automatic collections 3-8 of 59 requests had their tokens read late, in a burst
    after a 0.2-0.8 s silence (``traces.delivery``), which moves the client's TPOT; without them 1-2, as with no
    scrapes at all."""
    was = gc.isenabled()
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.unfreeze()
        if was:
            gc.enable()


async def _collect(col, cfg, headers, timeout, started) -> dict:
    import aiohttp

    complete = False
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout, headers=headers) as s:
        done = asyncio.Event()
        scraper = asyncio.create_task(col.scrape_loop(done))
        try:
            if cfg.phase2 is not None:
                from .phase2 import run_phase2

                await run_phase2(col, s)
            elif cfg.concurrency is not None:
                await _closed_loop(col, s)
            else:
                await _open_loop(col, s)
            await drain(col)
            complete = not col.stop.is_set() and not col.task_errors
        finally:
            col.interrupted = not complete
            pending = list(col.inflight)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            done.set()
            if complete:
                await scraper  # one last row at the next tick, so the token counters are complete
                await settle_latency(col)
            else:
                scraper.cancel()
                await asyncio.gather(scraper, return_exceptions=True)
            col.close_extras()
            if col.writer.num_requests:
                col.writer.write_meta(col.meta(started=started, finished=col.clock.epoch(), complete=complete))
                col.writer.close()
            else:  # nothing completed: no run the reader would refuse (failures.jsonl stays, for the errors)
                col.writer.discard()
    return col.summary()


async def settle_latency(col, wait_s: float = 3.0, every_s: float = 0.25) -> None:
    """Re-read the metrics page (no tick row) until the engine's request-latency histograms count every request the
    collection completed, for at most ``wait_s`` (server time): the server records a request's latencies when it
    finishes it, which can be after the client read the last token, so the last tick may miss the last few (seen: 57
    of 59 decode times)."""
    want = col.writer.num_requests if col.writer is not None else 0
    deadline = col.clock.mono() + wait_s
    while want and col.latency_first and col.latency_last:
        counted = min((last[1] - col.latency_first[k][1] for k, last in col.latency_last.items()
                       if k in col.latency_first), default=0.0)
        if counted >= want or col.clock.mono() >= deadline:
            return
        await asyncio.sleep(every_s * col.clock.time_scale)
        await col.scrape()
