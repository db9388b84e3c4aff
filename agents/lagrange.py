"""Lagrange multipliers for constrained RL: gradient ascent (OmniSafe's ``Lagrange``) and PID (Stooke et al.).

Both are updated once per epoch, *before* the policy update, from ``J_c``, the mean episodic cost of the
last rollout, against the cost limit ``d`` (docs/system_aware.md#6-cmdp-conventions):

* ``GradientLagrange`` (``omnisafe/common/lagrange.py``): ``lambda`` is a parameter trained by Adam on the
  loss ``-lambda * (J_c - d)`` and projected to ``[0, lambda_max]``; defaults lambda_0 = 0.001, lr 0.035.
* ``PIDLagrange`` (``omnisafe/common/pid_lagrange.py``, CPPOPID; Stooke, Achiam and Abbeel 2020):
  ``lambda = max(0, kp * EMA(e) + I + kd * max(0, EMA(J_c) - EMA(J_c) delay epochs ago))`` with
  ``e = J_c - d``, ``I = max(0, I + ki * e)``; defaults kp 0.1, ki 0.01, kd 0.01, delay 10, EMA alpha 0.95,
  penalty max 100. It damps the oscillation of plain gradient ascent.

The policy's surrogate then uses ``(A_r - lambda * A_c) / (1 + lambda)``.
"""

from __future__ import annotations

from collections import deque

__all__ = ["LAGRANGES", "GradientLagrange", "PIDLagrange", "make_lagrange"]


class GradientLagrange:
    """Adam ascent on ``lambda * (J_c - d)`` (a hand-written Adam on one scalar, as torch's would do)."""

    def __init__(self, cost_limit: float, *, init: float = 0.001, lr: float = 0.035, max_value: float | None = None,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if init < 0 or not lr > 0:
            raise ValueError("the initial multiplier must be >= 0 and the learning rate > 0")
        self.cost_limit, self.value, self.lr, self.max_value = cost_limit, float(init), lr, max_value
        self.b1, self.b2, self.eps = betas[0], betas[1], eps
        self._m = self._v = 0.0
        self._t = 0

    def update(self, mean_cost: float) -> float:
        g = -(mean_cost - self.cost_limit)          # gradient of the loss -lambda (J_c - d)
        self._t += 1
        self._m = self.b1 * self._m + (1 - self.b1) * g
        self._v = self.b2 * self._v + (1 - self.b2) * g * g
        mh = self._m / (1 - self.b1 ** self._t)
        vh = self._v / (1 - self.b2 ** self._t)
        self.value -= self.lr * mh / (vh ** 0.5 + self.eps)
        hi = self.max_value if self.max_value is not None else float("inf")
        self.value = min(max(self.value, 0.0), hi)
        return self.value


class PIDLagrange:
    def __init__(self, cost_limit: float, *, kp: float = 0.1, ki: float = 0.01, kd: float = 0.01, delay: int = 10,
                 alpha_p: float = 0.95, alpha_d: float = 0.95, max_value: float = 100.0):
        if delay < 1:
            raise ValueError("delay must be >= 1")
        self.cost_limit, self.kp, self.ki, self.kd = cost_limit, kp, ki, kd
        self.alpha_p, self.alpha_d, self.max_value = alpha_p, alpha_d, max_value
        self.value = 0.0
        self._i = 0.0
        self._p = 0.0
        self._d = 0.0
        self._hist: deque[float] = deque([0.0] * delay, maxlen=delay)

    def update(self, mean_cost: float) -> float:
        e = mean_cost - self.cost_limit
        self._i = max(0.0, self._i + self.ki * e)
        self._p = self.alpha_p * self._p + (1 - self.alpha_p) * e
        self._d = self.alpha_d * self._d + (1 - self.alpha_d) * mean_cost
        deriv = max(0.0, self._d - self._hist[0])
        self._hist.append(self._d)
        self.value = min(max(0.0, self.kp * self._p + self._i + self.kd * deriv), self.max_value)
        return self.value


LAGRANGES = {"gradient": GradientLagrange, "pid": PIDLagrange}


def make_lagrange(kind: str, cost_limit: float, **kwargs):
    try:
        return LAGRANGES[kind](cost_limit, **kwargs)
    except KeyError:
        raise ValueError(f"unknown Lagrangian {kind!r}; choose one of {sorted(LAGRANGES)}") from None
