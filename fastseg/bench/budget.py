"""How thoroughly each function of a case is timed: the full plan (``--full``: rounds, warm-up, samples,
seconds per measurement as asked) or the most thorough plan that fits the case's share of a time budget.

The default run gives every case ``CASE_SECONDS`` of timing, shared equally by the eager baseline and the
backends. A function that is fast for its share keeps the full plan (with fewer seconds per
measurement when needed); a slow one steps down a ladder (fewer warm-up calls and samples, one round);
one too slow for even one untimed and one timed call is timed **once**: a single call right after the
correctness check's calls (which warmed it up), marked in the results (``ref_once`` / ``once``).

Example::

    full = Plan(rounds=3, budget_s=0.5, min_reps=2, warmup=2)
    plan_timing(0.010, 1.5, full)   # 10 ms a call: the full plan
    plan_timing(4.0, 1.5, full)     # 4 s a call: Plan(..., once=True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

__all__ = ["CASE_SECONDS", "Plan", "plan_timing", "share_s"]

CASE_SECONDS = 1.5  # timing seconds per case in the default (budgeted) run; correctness and memory come on top


@dataclass(frozen=True)
class Plan:
    """How one function is timed.

    Attributes:
        rounds: interleaved rounds (CPU: baseline and backends alternate).
        budget_s: seconds of timed calls per round.
        min_reps: timed samples per round, at least.
        warmup: untimed calls after the first one, per round (0: the first call is the whole warm-up).
        once: a single timed call and nothing else (the other fields are ignored).
    """

    rounds: int
    budget_s: float
    min_reps: int
    warmup: int
    once: bool = False

    def cost_s(self, est_s: float) -> float:
        """Seconds this plan takes for a function of ``est_s`` seconds a call (the timing module's rules:
        the first call, ``warmup`` more plus ~10% of the budget, then at least ``min_reps`` samples)."""
        if self.once:
            return est_s
        warm = est_s * (1 + self.warmup) + (0.1 * self.budget_s if self.warmup else 0.0)
        return self.rounds * (warm + max(self.budget_s, self.min_reps * est_s))


def share_s(case_s: float, n_backends: int) -> float:
    """One function's share of a case's timing seconds: the baseline and each backend alike."""
    return case_s / (1 + max(n_backends, 0))


def plan_timing(est_s: float, time_s: float | None, full: Plan) -> Plan:
    """The most thorough plan for a function of ``est_s`` seconds a call within ``time_s`` seconds
    (None: no limit, the ``full`` plan). Steps: the full plan (its seconds per measurement cut to fit),
    then ``full.rounds`` rounds of one warm-up call and one sample, then one round with three samples
    (one warm-up call, then none), one round of one sample, and last a single call (``once``)."""
    if time_s is None:
        return full
    est_s = max(est_s, 0.0)
    ladder = [
        full,
        replace(full, warmup=min(full.warmup, 1), min_reps=1),
        Plan(1, full.budget_s, 3, min(full.warmup, 1)),
        Plan(1, full.budget_s, 3, 0),
        Plan(1, full.budget_s, 1, 0),
    ]
    for p in ladder:
        floor = replace(p, budget_s=0.0).cost_s(est_s)
        if floor <= time_s:
            # Seconds per measurement: as asked, or what the share leaves after the warm-up.
            left = time_s / p.rounds - est_s * (1 + p.warmup)
            budget = min(p.budget_s, max(left / (1.1 if p.warmup else 1.0), 0.0))
            return replace(p, budget_s=budget if math.isfinite(budget) else p.budget_s)
    return Plan(1, 0.0, 1, 0, once=True)
