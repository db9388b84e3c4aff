"""Paged KV cache with hash-chained prefix caching, mirroring ``vllm/v1/core/kv_cache_manager.py``
(``KVCacheManager.get_computed_blocks``, ``allocate_slots``, ``free``) and ``vllm/v1/core/block_pool.py``
(``BlockPool``, ``FreeKVCacheBlockQueue``, ``get_usage``).

Blocks are tracked in *runs* rather than one object per block, so a 2,000-token prompt costs O(1), not
O(125). A block's identity is ``(node, k)``: ``k`` is its index in the sequence and ``node`` hashes the
content chain up to the segment holding the block's last token, so two blocks share an identity exactly
when vLLM's chained block hashes would be equal. A run is a range ``[lo, hi)`` of one node's blocks::

    free queue (LRU head -> tail):  [anon x 900] [node A: 7..4] [node B: 30..0] [anon x 2] ...
                                     evicted first                      appended last
    cached index:  node -> runs sorted by lo, each either in use (ref > 0) or free (ref == 0, queued)

Within a free run the highest index is evicted first, as vLLM frees a request's blocks tail-first.
Blocks without an identity (partial last blocks, or everything with caching off) are anonymous counts.

Private content (a prompt given without segments, and every output) can only ever be hit by its own
request after a preemption, so its identities are registered when the request is preempted rather than
block by block as it is computed; a finished request releases them as anonymous blocks. Nothing
observable differs: nobody else could have looked them up.

Duplicates: vLLM does not de-duplicate (``BlockHashToBlockMap``): a request that computes a block whose
content is already cached (it could not hit it: the last-token cap, an evicted block earlier in the chain,
both computing at once) registers a second copy under the same hash. Lookups take the oldest copy
(``get_one_block``); evicting it exposes the next oldest. Here the first copy of a block lives in the index
(*primary* runs) and later copies in ``_dups`` (one run per registration, stamped with a creation counter,
``copy``); evicting primary blocks promotes, block by block, the oldest duplicate. A request's ranges name the
copy they hold, so freeing releases exactly its own blocks, in vLLM's tail-first order.

Release differences (``EngineConfig.vllm_version``): from vLLM 0.28 on, ``BlockPool.free_blocks`` puts a freed
block that has no hash (a request's partial last block) at the FRONT of the free queue, to be reused before any
cached block is evicted; 0.19 appends it like the others.

Differences from vLLM (documented, deliberate):
- Hits are counted per admitted request (``prefix_cache_queries`` += request tokens, ``hits`` += hit
  tokens), not per lookup attempt.
"""

from __future__ import annotations

from bisect import bisect_right
from operator import attrgetter

from .config import EngineConfig

__all__ = ["KVCacheManager", "OUTPUT_SEGMENT_END", "build_chain"]

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


class KVCacheManager:
    """Block pool + prefix cache of one replica. All methods are synchronous and time-free."""

    def __init__(self, config: EngineConfig):
        self.block_size = config.block_size
        self.max_model_len = config.max_model_len
        self.enable_caching = config.enable_prefix_caching
        self.num_usable = config.num_usable_blocks
        self.free = self.num_usable  # free blocks, evictable cached ones included
        head = _Run(None, 0, 0, -1)
        head.prev = head.next = head
        self._head = head
        self._index: dict[int, list[_Run]] = {}  # node -> primary runs (the oldest copy of each block)
        self._dups: dict[int, list[_Run]] = {}  # node -> later copies, one run per registration
        self._copies = 0  # copy stamps, in registration order
        self.num_evicted_blocks = 0
        # vLLM >= 0.28 (``BlockPool.free_blocks``): a freed block without a hash goes to the front of the free
        # queue. With caching off every block is anonymous and the order among them is unobservable.
        self.partial_first = self.enable_caching and config.has_behaviour("unhashed_blocks_reused_first")
        self._link_tail(_Run(None, 0, self.num_usable, 0))

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

    # ----------------------------------------------------------------- lookups
    @staticmethod
    def _chain(req) -> tuple[tuple[int, int, int, bool], ...]:
        """``req``'s content chain (``build_chain``), built on first use: a private prompt needs it only once
        it is preempted, and most never are."""
        chain = req.chain
        if not chain:
            chain = req.chain = build_chain(req.prompt_segments, req.num_prompt_tokens, req.seq_id)
        return chain

    def find_hit(self, req) -> tuple[int, int]:
        """Longest cached prefix of ``req`` in full blocks, capped so the last token is recomputed.

        Returns ``(hit_blocks, evictable_hit_blocks)``; no side effects (``get_computed_blocks``).
        """
        if not self.enable_caching or (req.prompt_segments is None and req.num_preemptions == 0):
            return 0, 0
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        k = evictable = 0
        index = self._index
        for node, _s, e, _sh in self._chain(req):
            b = min(e // bs, max_blocks)
            if b <= k:
                if b >= max_blocks:
                    break
                continue
            runs = index.get(node)
            if runs is None:
                break
            i = self._find(runs, k)
            if i < 0:
                break
            n_runs = len(runs)
            while k < b and i < n_runs:
                r = runs[i]
                if not (r.lo <= k < r.hi):
                    break
                top = r.hi if r.hi < b else b
                if r.ref == 0:
                    evictable += top - k
                k = top
                i += 1
            if k < b:
                break
        return k, evictable

    def _hit_ranges(self, req, hit_blocks: int):
        bs = self.block_size
        k = 0
        for node, _s, e, _sh in self._chain(req):
            if k >= hit_blocks:
                return
            b = min(e // bs, hit_blocks)
            if b > k:
                yield node, k, b
                k = b

    def _acquire(self, req, node: int, lo: int, hi: int) -> None:
        """ref += 1 over [lo, hi) of ``node``'s primary copies, held by ``req``; free runs leave the queue."""
        runs = self._index[node]
        i = self._find(runs, lo)
        if runs[i].lo < lo:
            self._split(runs, i, lo)
            i += 1
        while i < len(runs) and runs[i].lo < hi:
            r = runs[i]
            if r.hi > hi:
                self._split(runs, i, hi)
                r = runs[i]
            if r.ref == 0:
                self._unlink(r)
                self.free -= r.hi - r.lo
            r.ref += 1
            self._add_range(req, node, r.lo, r.hi, r.copy)
            i += 1

    @staticmethod
    def _add_range(req, node: int, lo: int, hi: int, copy: int) -> None:
        rs = req.kv_ranges
        if rs and rs[-1][0] == node and rs[-1][2] == lo and rs[-1][3] == copy:
            rs[-1][2] = hi
        else:
            rs.append([node, lo, hi, copy])

    # ----------------------------------------------------------------- allocation
    def blocks_needed(self, req, num_new_tokens: int, hit_blocks: int = 0, evictable: int = 0,
                      full_sequence_must_fit: bool = False, free: int | None = None) -> int | None:
        """Blocks ``allocate_slots`` would take, or ``None`` if it would fail (no side effects).

        ``free`` overrides the free-block count (to ask "would it fit after other allocations").
        """
        bs = self.block_size
        if free is None:
            free = self.free
        computed = req._num_computed_tokens + hit_blocks * bs
        if full_sequence_must_fit:
            full = req.num_tokens
            if full > self.max_model_len:
                full = self.max_model_len
            if -(-full // bs) - req.kv_blocks - hit_blocks + evictable > free:
                return None
        need = -(-(computed + num_new_tokens) // bs) - req.kv_blocks - hit_blocks
        if need < 0:
            need = 0
        if need + evictable > free:
            return None
        return need

    def allocate_slots(self, req, num_new_tokens: int, hit_blocks: int = 0, evictable: int = 0,
                       full_sequence_must_fit: bool = False) -> bool:
        """Give ``req`` the blocks for ``num_new_tokens`` more tokens (after ``hit_blocks`` prefix hits).

        Returns ``False`` and changes nothing when the free blocks do not suffice (vLLM returns ``None``).
        ``req._num_computed_tokens`` must be the request's computed tokens before the hit. Never preempts.
        """
        need = self.blocks_needed(req, num_new_tokens, hit_blocks, evictable, full_sequence_must_fit)
        if need is None:
            return False
        if hit_blocks:
            for node, lo, hi in self._hit_ranges(req, hit_blocks):
                self._acquire(req, node, lo, hi)
            req.kv_blocks += hit_blocks
            req.kv_reg = hit_blocks
        if need:
            self.pop_free(need)
            req.kv_anon += need
            req.kv_blocks += need
        if self.enable_caching:
            upto = req._num_computed_tokens + hit_blocks * self.block_size + num_new_tokens
            total = req.num_prompt_tokens + req._num_output_tokens  # req.num_tokens (an allocating request is not decoding)
            if req.prompt_segments is not None:  # user-given segments: shared identities to register
                self.cache_blocks(req, upto if upto < total else total)
            else:  # an all-private chain (build_chain): cache_blocks would only advance the mark
                full = (upto if upto < total else total) // self.block_size
                if full > req.kv_reg:
                    req.kv_reg = full
        return True

    def allocate_private_prompt(self, req, num_new_tokens: int, full_sequence_must_fit: bool = False) -> bool:
        """``allocate_slots(req, num_new_tokens, 0, 0, full_sequence_must_fit)`` for a request never scheduled
        before whose prompt has no segments (no prefix hit possible, nothing held, only private content): the
        common admission, without the general path's branches (once per request)."""
        bs, free = self.block_size, self.free
        if full_sequence_must_fit:
            full = req.num_prompt_tokens + req._num_output_tokens
            if full > self.max_model_len:
                full = self.max_model_len
            if -(-full // bs) > free:
                return False
        need = -(-num_new_tokens // bs)
        if need > free:
            return False
        if need:
            self.pop_free(need)
            req.kv_anon += need
            req.kv_blocks += need
        if self.enable_caching:  # an all-private chain: only the registration mark advances
            total = req.num_prompt_tokens + req._num_output_tokens
            full = (num_new_tokens if num_new_tokens < total else total) // bs
            if full > req.kv_reg:
                req.kv_reg = full
        return True

    def cache_blocks(self, req, num_tokens: int) -> None:
        """Give identities to the request's newly full blocks of *shared* content up to ``num_tokens``."""
        bs = self.block_size
        new_full = num_tokens // bs
        k = req.kv_reg
        if new_full <= k:
            return
        for node, s, e, shared in self._chain(req):
            b = e // bs
            if b <= k:
                continue
            a = s // bs
            if a >= new_full or not shared:
                break
            y = b if b < new_full else new_full
            self._register(req, node, k if k > a else a, y)
            k = y
            if k >= new_full:
                break
        req.kv_reg = new_full

    def cache_private(self, req, num_tokens: int) -> None:
        """Register the full blocks of private content (before a preemption frees them).

        The request's blocks with an identity are a prefix (hits, then shared content registered as computed);
        the private blocks after it are its anonymous ones.
        """
        if not self.enable_caching:
            return
        bs = self.block_size
        new_full = num_tokens // bs
        held = req.kv_blocks - req.kv_anon
        for node, s, e, shared in self._chain(req):
            a = s // bs
            if a >= new_full:
                break
            if not shared:
                b = e // bs
                b = b if b < new_full else new_full
                if b > held:
                    self._register(req, node, a if a > held else held, b)

    def _register(self, req, node: int, x: int, y: int) -> None:
        """Give ``req``'s anonymous blocks [x, y) of ``node`` their identity: primary where no copy is cached,
        else a duplicate (``BlockPool.cache_full_blocks`` inserts without de-duplicating)."""
        runs = self._index.get(node)
        if runs is None:
            runs = self._index[node] = []
        k = x
        rs = req.kv_ranges
        while k < y:
            i = bisect_right(runs, k, key=_lo) - 1
            if i >= 0 and runs[i].hi > k:  # already cached: this copy is a duplicate
                end = min(runs[i].hi, y)
                self._copies += 1
                self._dups.setdefault(node, []).append(_Run(node, k, end, 1, self._copies, True))
                self._add_range(req, node, k, end, self._copies)
            else:
                nxt = runs[i + 1].lo if i + 1 < len(runs) else y
                end = nxt if nxt < y else y
                prev = runs[i] if i >= 0 else None
                if (prev is not None and prev.hi == k and prev.ref == 1 and rs and rs[-1][0] == node
                        and rs[-1][2] == k and rs[-1][3] == prev.copy):
                    prev.hi = end  # extend this request's own run
                    cp = prev.copy
                else:
                    self._copies += 1
                    cp = self._copies
                    runs.insert(i + 1, _Run(node, k, end, 1, cp))
                self._add_range(req, node, k, end, cp)
            req.kv_anon -= end - k
            k = end
        if not runs:
            del self._index[node]

    def free_request(self, req) -> None:
        """Release all of ``req``'s blocks, tail first (``KVCacheManager.free``).

        From vLLM 0.28 on, the partial last block (the only one vLLM leaves without a hash) goes to the front
        of the free queue instead; the request's other anonymous blocks carry hashes in vLLM (private content
        nobody else can hit) and still go to the back.
        """
        anon = req.kv_anon
        if anon and self.partial_first and req._num_computed_tokens % self.block_size:
            anon -= 1
            self.free += 1
            first = self._head.next
            if first is not self._head and first.node is None:
                first.hi += 1
            else:
                self._link_after(self._head, _Run(None, 0, 1, 0))
        if anon:
            self.free += anon
            tail = self._head.prev  # _append_anon(anon), inlined: once per request
            if tail is not self._head and tail.node is None:
                tail.hi += anon
            else:
                self._link_tail(_Run(None, 0, anon, 0))
        dups = self._dups
        for node, lo, hi, cp in reversed(req.kv_ranges):
            if node in dups:
                for r in self._runs_of(node, lo, hi, cp):
                    r.ref -= 1
                    if r.ref == 0:
                        self.free += r.hi - r.lo
                        self._link_tail(r)
                continue
            runs = self._index[node]  # no duplicates: the request's copy is the primary one
            i = self._find(runs, hi - 1)
            while i >= 0 and runs[i].hi > lo:
                r = runs[i]
                r.ref -= 1
                if r.ref == 0:
                    self.free += r.hi - r.lo
                    self._link_tail(r)
                i -= 1
        req.kv_ranges = []
        req.kv_anon = req.kv_blocks = req.kv_reg = 0

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
