"""Block identities and the block pool under ``sim.kv_cache.KVCacheManager``, mirroring
``vllm/v1/core/block_pool.py`` (``BlockPool``, ``FreeKVCacheBlockQueue``, ``BlockHashToBlockMap``, ``get_usage``)
and the chained block hashes of ``vllm/v1/core/kv_cache_utils.py`` (``hash_block_tokens``).

Split from ``sim/kv_cache.py`` to keep files short: this module holds the content chain (``build_chain``), the
run record (``_Run``) and ``BlockPoolMixin``, the free queue, cached index, gauges and invariant checks that
``KVCacheManager`` inherits (a base class, so the hot path gains no call layer); the manager keeps the
lookups, allocation, registration and release that ``vllm/v1/core/kv_cache_manager.py`` does.

Blocks are tracked in *runs* rather than one object per block, so a 2,000-token prompt costs O(1), not
O(125). A block's identity is ``(node, k)``: ``k`` is its index in the sequence and ``node`` hashes the
content chain up to the segment holding the block's last token, so two blocks share an identity exactly
when vLLM's chained block hashes would be equal. A run is a range ``[lo, hi)`` of one node's blocks::

    free queue (LRU head -> tail):  [anon x 900] [node A: 7..4] [node B: 30..0] [anon x 2] ...
                                     evicted first                      appended last
    cached index:  node -> runs sorted by lo, each either in use (ref > 0) or free (ref == 0, queued)

Within a free run the highest index is evicted first, as vLLM frees a request's blocks tail-first.
Blocks without an identity (partial last blocks, or everything with caching off) are anonymous counts.

Duplicates: vLLM does not de-duplicate (``BlockHashToBlockMap``): a request that computes a block whose
content is already cached (it could not hit it: the last-token cap, an evicted block earlier in the chain,
both computing at once) registers a second copy under the same hash. Lookups take the oldest copy
(``get_one_block``); evicting it exposes the next oldest. Here the first copy of a block lives in the index
(*primary* runs) and later copies in ``_dups`` (one run per registration, stamped with a creation counter,
``copy``); evicting primary blocks promotes, block by block, the oldest duplicate. A request's ranges name the
copy they hold, so freeing releases exactly its own blocks, in vLLM's tail-first order.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import attrgetter

__all__ = ["OUTPUT_SEGMENT_END", "BlockPoolMixin", "build_chain"]

OUTPUT_SEGMENT_END = 1 << 62  # the output segment grows without bound
_lo = attrgetter("lo")


def build_chain(prompt_segments, num_prompt_tokens: int, seq_id: int) -> tuple[tuple[int, int, int, bool], ...]:
    """Content chain of a request: ``(node, start_token, end_token, shared)`` per segment, output last.

    A node hashes (previous node, previous segment length, content id), so it identifies the whole content
    before the segment plus the segment's stream. Python's hash of int tuples is deterministic.
    User-given segments are *shared* (other requests may hit them); a prompt without segments and every
    output are private to the request.
    """
    if prompt_segments is None:  # the common case, unrolled: one private prompt segment, then the output
        node = hash((0, 0, -2 * seq_id - 1))
        return ((node, 0, num_prompt_tokens, False),
                (hash((node, num_prompt_tokens, -2 * seq_id - 2)), num_prompt_tokens, OUTPUT_SEGMENT_END, False))
    chain = []
    node, prev_len, start = 0, 0, 0
    for cid, n in prompt_segments:
        node = hash((node, prev_len, cid))
        chain.append((node, start, start + n, True))
        start += n
        prev_len = n
    node = hash((node, prev_len, -2 * seq_id - 2))
    chain.append((node, start, OUTPUT_SEGMENT_END, False))
    return tuple(chain)


class _Run:
    __slots__ = ("node", "lo", "hi", "ref", "prev", "next", "copy", "dup")

    def __init__(self, node, lo, hi, ref, copy=0, dup=False):
        self.node, self.lo, self.hi, self.ref, self.copy, self.dup = node, lo, hi, ref, copy, dup
        self.prev = self.next = None

    def __repr__(self):
        return f"_Run({self.node}, {self.lo}, {self.hi}, ref={self.ref}, copy={self.copy}{', dup' if self.dup else ''})"


class BlockPoolMixin:
    """The free queue and cached index of ``KVCacheManager`` (``BlockPool``); it owns no state of its own:
    ``KVCacheManager.__init__`` sets ``free``, ``num_usable``, ``_head``, ``_index``, ``_dups`` and
    ``num_evicted_blocks``. All methods are synchronous and time-free."""

    # ----------------------------------------------------------------- free queue
    def _link_tail(self, run: _Run) -> None:
        head = self._head
        tail = head.prev
        run.prev, run.next = tail, head
        tail.next = run
        head.prev = run

    def _link_after(self, where: _Run, run: _Run) -> None:
        nxt = where.next
        run.prev, run.next = where, nxt
        where.next = run
        nxt.prev = run

    @staticmethod
    def _unlink(run: _Run) -> None:
        run.prev.next = run.next
        run.next.prev = run.prev
        run.prev = run.next = None

    def _append_anon(self, count: int) -> None:
        tail = self._head.prev
        if tail is not self._head and tail.node is None:
            tail.hi += count
        else:
            self._link_tail(_Run(None, 0, count, 0))

    def pop_free(self, m: int) -> None:
        """Take ``m`` blocks from the head of the free queue, evicting any identity they carry."""
        head = self._head
        r = head.next
        if r.node is None and r.hi - r.lo > m:  # the common case: part of an anonymous run (m < free)
            r.hi -= m
            self.free -= m
            return
        if m > self.free:
            raise RuntimeError(f"pop_free({m}) with only {self.free} free blocks")
        self.free -= m
        while m:
            r = head.next
            size = r.hi - r.lo
            if size <= m:
                m -= size
                self._unlink(r)
                if r.node is not None:
                    self.num_evicted_blocks += size
                    self._evict(r, r.lo, r.hi, True)
            else:
                r.hi -= m  # highest indices first
                if r.node is not None:
                    self.num_evicted_blocks += m
                    self._evict(r, r.hi, r.hi + m, False)
                m = 0

    # ----------------------------------------------------------------- cached index
    def _evict(self, run: _Run, a: int, b: int, whole: bool) -> None:
        """Blocks [a, b) of ``run`` lost their identity (``whole``: the run is gone); an evicted primary block
        exposes its oldest duplicate (``BlockHashToBlockMap.pop`` then ``get_one_block``)."""
        store = self._dups if run.dup else self._index
        if whole:
            runs = store[run.node]
            runs.remove(run)
            if not runs:
                del store[run.node]
        if not run.dup and run.node in self._dups:
            self._promote(run.node, a, b)

    def _promote(self, node: int, a: int, b: int) -> None:
        """Make the oldest duplicate of each block in [a, b) of ``node`` its primary copy."""
        gaps = [(a, b)]  # blocks still without a primary copy, ascending
        for d in sorted(self._dups[node], key=attrgetter("copy")):
            todo = []
            for u, v in gaps:
                c = max(u, d.lo) if d is not None else v
                e = min(v, d.hi) if d is not None else v
                if c >= e:
                    todo.append((u, v))
                    continue
                d = self._carve(d, c, e)  # what is left of d lies right of e
                todo += [g for g in ((u, c), (e, v)) if g[0] < g[1]]
            gaps = todo
            if not gaps:
                break
        if not self._dups[node]:
            del self._dups[node]

    def _carve(self, d: _Run, c: int, e: int) -> _Run | None:
        """Move blocks [c, e) of duplicate run ``d`` into the primary index, keeping free-queue order; return
        the part of ``d`` right of ``e`` (still a duplicate), or None."""
        dups = self._dups[d.node]
        if d.lo < c:
            dups.append(self._cut(d, c))  # [lo, c) stays a duplicate; d is now [c, hi)
        if d.hi > e:
            mid, rest = self._cut(d, e), d  # d keeps [e, hi) and its place in the list
        else:
            dups.remove(d)
            mid, rest = d, None
        mid.dup = False
        runs = self._index.setdefault(mid.node, [])
        runs.insert(bisect_right(runs, mid.lo, key=_lo), mid)
        return rest

    def _cut(self, r: _Run, at: int) -> _Run:
        """Split ``r`` at block ``at``: ``r`` keeps [at, hi), the returned run is [lo, at) (same copy); a free
        run's low part follows it in the queue (higher indices are evicted first)."""
        low = _Run(r.node, r.lo, at, r.ref, r.copy, r.dup)
        r.lo = at
        if r.ref == 0:
            self._link_after(r, low)
        return low

    def _find(self, runs: list[_Run], k: int) -> int:
        """Index in ``runs`` of the run containing block k, or -1."""
        i = bisect_right(runs, k, key=_lo) - 1
        if i >= 0 and runs[i].hi > k:
            return i
        return -1

    def _split(self, runs: list[_Run], i: int, at: int) -> None:
        """Split runs[i] at block ``at`` into [lo, at) and [at, hi); queue order is kept (high part first)."""
        runs.insert(i, self._cut(runs[i], at))

    def _runs_of(self, node: int, lo: int, hi: int, cp: int) -> list[_Run]:
        """The runs of copy ``cp`` inside [lo, hi) of ``node``, highest blocks first (primary or duplicate)."""
        out = []
        runs = self._index.get(node)
        if runs:
            i = bisect_right(runs, hi - 1, key=_lo) - 1
            while i >= 0 and runs[i].hi > lo:
                if runs[i].copy == cp:
                    out.append(runs[i])
                i -= 1
        dups = self._dups.get(node)
        if dups:
            out += [d for d in dups if d.copy == cp and d.lo < hi and d.hi > lo]
            out.sort(key=_lo, reverse=True)
        return out

    # ----------------------------------------------------------------- gauges and checks
    @property
    def usage(self) -> float:
        """``1 - free / (num_gpu_blocks - 1)``; evictable cached blocks count as free."""
        return 1.0 - self.free / self.num_usable

    @property
    def num_cached_blocks(self) -> int:
        return sum(r.hi - r.lo for runs in self._index.values() for r in runs)

    def check_invariants(self, holders) -> None:
        """Blocks are conserved: free queue == free count; in-use runs + anonymous holdings == used."""
        q = 0
        r = self._head.next
        while r is not self._head:
            assert r.ref == 0 and r.hi > r.lo, f"bad free run {r}"
            q += r.hi - r.lo
            r = r.next
        assert q == self.free, f"free queue holds {q} blocks, free count says {self.free}"
        for node, runs in self._index.items():
            assert runs, f"empty run list for node {node}"
            for a, b in zip(runs, runs[1:], strict=False):
                assert a.hi <= b.lo, f"overlapping runs {a} {b}"
            assert not any(x.dup for x in runs), f"a duplicate among the primary runs of {node}"
        for node, dups in self._dups.items():
            assert dups and all(d.dup for d in dups), f"bad duplicate list for node {node}"
            for d in dups:  # a duplicate always has an older primary copy
                runs = self._index.get(node, [])
                covered = sum(min(r.hi, d.hi) - max(r.lo, d.lo) for r in runs if r.lo < d.hi and r.hi > d.lo)
                assert covered == d.hi - d.lo, f"duplicate {d} without a primary copy"
        every = [x for store in (self._index, self._dups) for runs in store.values() for x in runs]
        in_use = sum(x.hi - x.lo for x in every if x.ref > 0)
        anon = sum(h.kv_anon for h in holders)
        assert in_use + anon == self.num_usable - self.free, (
            f"blocks not conserved: in-use cached {in_use} + anonymous {anon} != used {self.num_usable - self.free}")
        refs: dict[int, int] = {}
        for h in holders:
            for node, lo, hi, cp in h.kv_ranges:
                mine = self._runs_of(node, lo, hi, cp)
                assert sum(r.hi - r.lo for r in mine) == hi - lo, f"holder range {(node, lo, hi, cp)} not all held"
                for r in mine:
                    refs[id(r)] = refs.get(id(r), 0) + 1
        for run in every:
            assert refs.get(id(run), 0) == run.ref, f"run {run} ref {run.ref} != holders {refs.get(id(run), 0)}"
