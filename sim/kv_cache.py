"""Paged KV cache with hash-chained prefix caching, mirroring ``vllm/v1/core/kv_cache_manager.py``
(``KVCacheManager.get_computed_blocks``, ``allocate_slots``, ``free``) and ``vllm/v1/core/block_pool.py``
(``BlockPool``, ``FreeKVCacheBlockQueue``, ``get_usage``).

Block identities, the run record and the free queue / cached index (``BlockPoolMixin``) live in
``sim/kv_blocks.py``; this module holds the manager: lookups, allocation, registration and release.

Private content (a prompt given without segments, and every output) can only ever be hit by its own
request after a preemption, so its identities are registered when the request is preempted rather than
block by block as it is computed; a finished request releases them as anonymous blocks. Nothing
observable differs: nobody else could have looked them up.

Release differences (``EngineConfig.vllm_version``): from vLLM 0.28 on, ``BlockPool.free_blocks`` puts a freed
block that has no hash (a request's partial last block) at the FRONT of the free queue, to be reused before any
cached block is evicted; 0.19 appends it like the others.

Differences from vLLM (documented, deliberate):
- Hits are counted per admitted request (``prefix_cache_queries`` += request tokens, ``hits`` += hit
  tokens), not per lookup attempt.
"""

from __future__ import annotations

from bisect import bisect_right

from .config import EngineConfig
from .kv_blocks import OUTPUT_SEGMENT_END, BlockPoolMixin, _lo, _Run, build_chain

__all__ = ["KVCacheManager", "OUTPUT_SEGMENT_END", "build_chain"]


class KVCacheManager(BlockPoolMixin):
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

