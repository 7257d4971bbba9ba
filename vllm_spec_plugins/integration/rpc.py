"""Functions for ``llm.collective_rpc(fn)``: read or drive a worker's drafter.

Tests and the benchmark call these in every worker (they receive the worker).
"""

from __future__ import annotations

import time
from typing import Any

from .drafter import PluginDrafter


def _drafter(worker: Any) -> PluginDrafter | None:
    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return drafter if isinstance(drafter, PluginDrafter) else None


def drafter_snapshot(worker: Any) -> dict[str, Any] | None:
    """The drafter's counters (None when the engine runs no PluginDrafter)."""
    drafter = _drafter(worker)
    return drafter.snapshot() if drafter is not None else None


def scorer_snapshot(worker: Any) -> dict[str, Any] | None:
    """The lossy scorer's counters (accepted by the standard rule vs only by the
    scorer, in total and per request); None when no lossy scorer runs here."""
    from .scoring import scorer_snapshot_of

    runner = getattr(worker, "model_runner", None)
    return scorer_snapshot_of(runner) if runner is not None else None


def flush_shared_state(worker: Any, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """Push this replica's new state to the hub and merge what the others
    pushed, waiting up to ``timeout_s``. None when sharing is off here."""
    drafter = _drafter(worker)
    if drafter is None or drafter.sharing is None:
        return None
    return drafter.sharing.flush(timeout_s)


def save_proposer_state(worker: Any) -> bool:
    """Save the proposer's state files now (before a planned shutdown; tests).
    False when there is no PluginDrafter here or this rank does not own the state."""
    drafter = _drafter(worker)
    if drafter is None or not drafter.saver.enabled:
        return False
    drafter.saver.save_now()
    return True


class _DraftTimer:
    """Wraps one runner's ``propose_draft_token_ids`` and adds up its wall time:
    the drafting overhead of any method (vLLM's ngram/suffix/draft_model too),
    measured at the one call every drafter goes through. On a GPU, model-based
    drafters launch kernels asynchronously, so the time there is the host side."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def install_draft_timer(worker: Any) -> bool:
    """Time this worker's drafting from now on (benchmarks). False when the
    engine has no drafter (no speculation)."""
    runner = getattr(worker, "model_runner", None)
    if runner is None or getattr(runner, "drafter", None) is None:
        return False
    if not isinstance(runner.__dict__.get("propose_draft_token_ids"), _DraftTimer):
        # an instance attribute shadows the (possibly patched) class method
        runner.propose_draft_token_ids = _DraftTimer(runner.propose_draft_token_ids)
    return True


def draft_timer_snapshot(worker: Any) -> dict[str, Any] | None:
    """Seconds spent drafting and the number of drafting calls; None if not installed."""
    runner = getattr(worker, "model_runner", None)
    timer = getattr(runner, "__dict__", {}).get("propose_draft_token_ids")
    if not isinstance(timer, _DraftTimer):
        return None
    return {"seconds": timer.seconds, "calls": timer.calls}
