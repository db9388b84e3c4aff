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

Differences from vLLM (documented, deliberate):
- A block computed twice concurrently (vLLM keeps both copies under one hash) is kept as an anonymous
  block for the second request, so only one cached copy survives its release.
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
    __slots__ = ("node", "lo", "hi", "ref", "prev", "next")

    def __init__(self, node, lo, hi, ref):
        self.node, self.lo, self.hi, self.ref = node, lo, hi, ref
        self.prev = self.next = None

    def __repr__(self):
        return f"_Run({self.node}, {self.lo}, {self.hi}, ref={self.ref})"


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
        self._index: dict[int, list[_Run]] = {}
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
                    self._index_remove(r)
            else:
                r.hi -= m  # highest indices first
                if r.node is not None:
                    self.num_evicted_blocks += m
                m = 0

    # ----------------------------------------------------------------- cached index
    def _index_remove(self, run: _Run) -> None:
        runs = self._index[run.node]
        runs.remove(run)
        if not runs:
            del self._index[run.node]

    def _find(self, runs: list[_Run], k: int) -> int:
        """Index in ``runs`` of the run containing block k, or -1."""
        i = bisect_right(runs, k, key=_lo) - 1
        if i >= 0 and runs[i].hi > k:
            return i
        return -1

    def _split(self, runs: list[_Run], i: int, at: int) -> None:
        """Split runs[i] at block ``at`` into [lo, at) and [at, hi); queue order is kept (high part first)."""
        r = runs[i]
        low = _Run(r.node, r.lo, at, r.ref)
        r.lo = at
        runs.insert(i, low)
        if r.ref == 0:
            self._link_after(r, low)

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

    def _acquire(self, node: int, lo: int, hi: int) -> None:
        """ref += 1 over [lo, hi) of ``node``; free runs leave the queue."""
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
            i += 1

    @staticmethod
    def _add_range(req, node: int, lo: int, hi: int) -> None:
        rs = req.kv_ranges
        if rs and rs[-1][0] == node and rs[-1][2] == lo:
            rs[-1][2] = hi
        else:
            rs.append([node, lo, hi])

    # ----------------------------------------------------------------- allocation
    def blocks_needed(self, req, num_new_tokens: int, hit_blocks: int = 0, evictable: int = 0,
                      full_sequence_must_fit: bool = False, free: int | None = None) -> int | None:
        """Blocks ``allocate_slots`` would take, or ``None`` if it would fail (no side effects).

        ``free`` overrides the free-block count (to ask "would it fit after other allocations").
        """
        bs = self.block_size
        if free is None:
            free = self.free
        computed = req._c + hit_blocks * bs
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
        ``req._c`` must be the request's computed tokens before the hit. Never preempts.
        """
        need = self.blocks_needed(req, num_new_tokens, hit_blocks, evictable, full_sequence_must_fit)
        if need is None:
            return False
        if hit_blocks:
            for node, lo, hi in self._hit_ranges(req, hit_blocks):
                self._acquire(node, lo, hi)
                self._add_range(req, node, lo, hi)
            req.kv_blocks += hit_blocks
            req.kv_reg = hit_blocks
        if need:
            self.pop_free(need)
            req.kv_anon += need
            req.kv_blocks += need
        if self.enable_caching:
            upto = req._c + hit_blocks * self.block_size + num_new_tokens
            total = req.num_prompt_tokens + req._out  # req.num_tokens (an allocating request is not decoding)
            if req.prompt_segments is not None:  # user-given segments: shared identities to register
                self.cache_blocks(req, upto if upto < total else total)
            else:  # an all-private chain (build_chain): cache_blocks would only advance the mark
                full = (upto if upto < total else total) // self.block_size
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
        """Register the full blocks of private content (before a preemption frees them)."""
        if not self.enable_caching:
            return
        bs = self.block_size
        new_full = num_tokens // bs
        for node, s, e, shared in self._chain(req):
            a = s // bs
            if a >= new_full:
                break
            if not shared:
                b = e // bs
                self._register(req, node, a, b if b < new_full else new_full)

    def _register(self, req, node: int, x: int, y: int) -> None:
        runs = self._index.get(node)
        if runs is None:
            runs = self._index[node] = []
        k = x
        while k < y:
            i = bisect_right(runs, k, key=_lo) - 1
            if i >= 0 and runs[i].hi > k:  # already cached: a duplicate copy stays anonymous
                k = min(runs[i].hi, y)
                continue
            nxt = runs[i + 1].lo if i + 1 < len(runs) else y
            end = nxt if nxt < y else y
            prev = runs[i] if i >= 0 else None
            rs = req.kv_ranges
            if (prev is not None and prev.hi == k and prev.ref == 1 and rs and rs[-1][0] == node
                    and rs[-1][2] == k):
                prev.hi = end  # extend this request's own run
            else:
                runs.insert(i + 1, _Run(node, k, end, 1))
            self._add_range(req, node, k, end)
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
        if anon and self.partial_first and req._c % self.block_size:
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
        for node, lo, hi in reversed(req.kv_ranges):
            runs = self._index[node]
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
        in_use = 0
        for node, runs in self._index.items():
            assert runs, f"empty run list for node {node}"
            for a, b in zip(runs, runs[1:], strict=False):
                assert a.hi <= b.lo, f"overlapping runs {a} {b}"
            in_use += sum(x.hi - x.lo for x in runs if x.ref > 0)
        anon = sum(h.kv_anon for h in holders)
        assert in_use + anon == self.num_usable - self.free, (
            f"blocks not conserved: in-use cached {in_use} + anonymous {anon} != used {self.num_usable - self.free}")
        refs: dict[tuple[int, int], int] = {}
        for h in holders:
            for node, lo, hi in h.kv_ranges:
                for run in self._index[node]:
                    if run.lo < hi and run.hi > lo:
                        assert lo <= run.lo and run.hi <= hi, f"holder range {(lo, hi)} cuts run {run}"
                        refs[(node, run.lo)] = refs.get((node, run.lo), 0) + 1
        for node, runs in self._index.items():
            for run in runs:
                assert refs.get((node, run.lo), 0) == run.ref, f"run {run} ref {run.ref} != holders {refs.get((node, run.lo), 0)}"
