"""Requests and their records, mirroring ``vllm/v1/request.py`` and ``vllm/v1/metrics/stats.py``.

Lifecycle (``RequestStatus``)::

    submit --(too long)--> REJECTED
      |
      v
    WAITING --admit--> RUNNING --last token--> FINISHED_LENGTH_CAPPED
      ^                  |
      +--- PREEMPTED <---+   (recompute: blocks freed, progress reset, front of waiting)

Not simulated: stop strings / EOS (outputs have a fixed length, as in the measured runs), n > 1, logprobs,
structured output, LoRA, speculative decoding, KV connectors, encoder inputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from enum import IntEnum

__all__ = ["RejectReason", "Request", "RequestRecord", "RequestStatus"]


class RequestStatus(IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH_CAPPED = 4
    FINISHED_ABORTED = 5
    REJECTED = 6

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


class RejectReason:
    """Why a request was never queued (vLLM's frontend returns HTTP 400 for these)."""

    PROMPT_TOO_LONG = "prompt_plus_max_tokens_exceeds_max_model_len"
    EMPTY_PROMPT = "empty_prompt"
    BAD_MAX_TOKENS = "max_tokens_below_1"


_NAN = float("nan")
_WAITING = RequestStatus.WAITING  # a module constant: an Enum class-attribute lookup costs ~10x more


class _DecodeClock:
    """The engine's count of decode steps; decoding requests derive their progress from it."""

    __slots__ = ("D",)

    def __init__(self) -> None:
        self.D = 0


class Request:
    """One generation request on one replica.

    ``prompt_segments`` describes prompt *content* for the prefix cache: a tuple of
    ``(content_id, num_tokens)`` with content ids >= 0, e.g. ``((SYSTEM_PROMPT, 600), (task_id, 200))``.
    Two requests share cached blocks exactly where their segment sequences agree. ``None`` means a
    unique prompt that can only hit its own blocks (after a preemption). Output tokens are always unique
    to the request.
    """

    __slots__ = (
        "request_id", "seq_id", "num_prompt_tokens", "max_tokens", "prompt_segments", "status",
        "num_preemptions", "num_cached_tokens", "arrival_time", "queued_ts", "scheduled_ts",
        "first_token_ts", "last_token_ts", "last_output_ts", "reject_reason", "replica", "tag", "on_finish",
        # engine-private state (``EngineCore``): progress as vLLM's ``Request`` names it; while a request decodes
        # in the engine's aggregate, its progress is ``base + decode clock`` instead (the properties below)
        "_num_computed_tokens", "_num_output_tokens", "_is_decoding", "_computed_base", "_output_base",
        "_finish_step", "_admit_seq", "_decode_clock",
        "kv_ranges", "kv_anon", "kv_blocks", "kv_reg", "chain",
    )

    def __init__(
        self,
        request_id: str,
        num_prompt_tokens: int,
        max_tokens: int,
        arrival_time: float = 0.0,
        prompt_segments: tuple[tuple[int, int], ...] | None = None,
        tag: object = None,
    ) -> None:
        self.request_id = request_id
        self.seq_id = self.replica = -1
        self.num_prompt_tokens = int(num_prompt_tokens)
        self.max_tokens = int(max_tokens)
        self.prompt_segments = prompt_segments
        self.status = _WAITING
        self.num_cached_tokens = -1
        self.arrival_time = float(arrival_time)
        self.queued_ts = self.scheduled_ts = self.first_token_ts = self.last_token_ts = self.last_output_ts = _NAN
        self.reject_reason: str | None = None
        self.tag = tag
        self.on_finish = self._decode_clock = None
        self._is_decoding = False
        self.num_preemptions = self._num_computed_tokens = self._num_output_tokens = 0
        self._computed_base = self._output_base = self._finish_step = self._admit_seq = 0
        self.kv_anon = self.kv_blocks = self.kv_reg = 0
        self.kv_ranges: list[list[int]] = []
        self.chain: tuple[tuple[int, int, int, bool], ...] = ()  # built by the KV cache manager on first use

    # vLLM's names; decoding requests derive their progress from the engine's decode clock.
    @property
    def num_computed_tokens(self) -> int:
        return self._computed_base + self._decode_clock.D if self._is_decoding else self._num_computed_tokens

    @property
    def num_output_tokens(self) -> int:
        return self._output_base + self._decode_clock.D if self._is_decoding else self._num_output_tokens

    @property
    def num_tokens(self) -> int:
        out = self._output_base + self._decode_clock.D if self._is_decoding else self._num_output_tokens
        return self.num_prompt_tokens + out

    def __deepcopy__(self, memo) -> Request:
        """A world snapshot's copy (``envs.background``), slot by slot: numbers, strings, enums and the
        content chain are immutable and shared; the KV ranges are copied; the decode clock, the replica's
        callbacks and the tag go through ``memo`` so they map to the copied world's. ~10x a generic copy."""
        new = Request.__new__(Request)
        memo[id(self)] = new
        for k in _SLOTS:
            v = getattr(self, k)
            if k == "kv_ranges":
                v = [list(r) for r in v]
            elif k in _DEEP and v is not None:
                v = copy.deepcopy(v, memo)
            setattr(new, k, v)
        return new

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, {self.status.name}, prompt={self.num_prompt_tokens}, "
                f"out={self.num_output_tokens}/{self.max_tokens}, computed={self.num_computed_tokens})")


_SLOTS = Request.__slots__
_DEEP = frozenset(("_decode_clock", "on_finish", "tag", "reject_reason"))


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One finished or rejected request. Times are simulated seconds.

    Engine-side metrics follow the measured run format (``docs/vllm.md#8-run-format``): TTFT = first_token -
    queued, TPOT = (last_token - first_token)/(output - 1), E2E = last_token - queued, queue = scheduled -
    queued. Client-side ones add the frontend and streaming overheads.
    """

    request_id: str
    replica: int
    pool: str
    status: str
    reject_reason: str | None
    prompt_tokens: int
    output_tokens: int
    arrival_s: float
    queued_s: float
    scheduled_s: float
    first_token_s: float
    last_token_s: float
    done_s: float
    num_preemptions: int
    num_cached_tokens: int

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.queued_s

    @property
    def tpot_s(self) -> float:
        return (self.last_token_s - self.first_token_s) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0

    @property
    def e2e_s(self) -> float:
        return self.last_token_s - self.queued_s

    @property
    def queue_s(self) -> float:
        return self.scheduled_s - self.queued_s
