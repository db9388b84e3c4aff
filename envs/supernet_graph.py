"""Which LAMaS/MaAS graph a query runs through (``envs.supernet``'s fixed steps and CP rules by task, split,
execution mode and graph variant). Moved out of ``envs.supernet`` unchanged; re-exported there."""

from __future__ import annotations

from dataclasses import dataclass

from .tasks import TaskSpec

__all__ = ["GraphConfig"]


@dataclass(frozen=True, slots=True, kw_only=True)
class GraphConfig:
    """Which LAMaS/MaAS graph runs: task, split, execution mode and graph variant
    (docs/lamas.md#1-operators, #2-fixed-steps)."""

    task: TaskSpec
    split: str = "train"
    execution: str = "parallel"
    variant: str = "lamas"

    def __post_init__(self) -> None:
        if self.split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {self.split!r}")
        if self.execution not in ("parallel", "sequential"):
            raise ValueError(f"execution must be 'parallel' or 'sequential', got {self.execution!r}")
        if self.variant not in ("lamas", "maas"):
            raise ValueError(f"variant must be 'lamas' or 'maas', got {self.variant!r}")

    @property
    def parallel(self) -> bool:
        return self.execution == "parallel"

    @property
    def pre_programmer(self) -> bool:
        """MATH: Programmer + refine before the layers on train, and on test for MaAS (not in CP)."""
        return self.task.name == "math" and (self.split == "train" or self.variant == "maas")

    @property
    def mgcot_concurrent(self) -> bool:
        """MultiGenerateCoT's calls: sequential in GSM8K and MATH-train, concurrent in MATH-test and code."""
        return self.task.kind == "code" or (self.task.name == "math" and self.split == "test")

    @property
    def programmer_tool_in_cp(self) -> bool:
        """Execution time is returned only by the GSM8K-test and MATH-train Programmers (and only the
        parallel branch adds it)."""
        return self.parallel and ((self.task.name == "gsm8k" and self.split == "test") or
                                  (self.task.name == "math" and self.split == "train"))

    @property
    def verify_tool_in_cp(self) -> bool:
        return self.task.name == "gsm8k" and self.split == "test"
