"""Times the engine's pure decode steps for the measured draft price.

Each step's start closes the previous step's timing (start to start). Only
pure decode steps count (every scheduled request verifies its last token plus
its drafts; no prefill) that follow at once (no new request, so no idle gap).
The fit itself, ``StepCostModel``, is plain Python in proposers/step_cost.py.
"""

from __future__ import annotations

import time
from typing import Any

from vllm_spec_plugins.proposers.step_cost import StepCostModel


class StepTimer:
    def __init__(self, model: StepCostModel | None = None, clock=time.perf_counter) -> None:
        self.model = model or StepCostModel()
        #: Seconds now; a test or stand-in runner may set a synthetic clock.
        self.clock = clock
        self._pending: tuple[float, int, int] | None = None  # (start, tokens, rows)
        self.output_tokens = 0  # tokens emitted by the step being timed

    def on_step_start(self, scheduler_output: Any) -> None:
        now = self.clock()
        try:
            pending, self._pending = self._pending, None
            total = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            new_reqs = getattr(scheduler_output, "scheduled_new_reqs", None) or ()
            if pending is not None and total > 0 and not new_reqs:
                start, tokens, rows = pending
                self.model.observe(tokens, rows, self.output_tokens, now - start)
            self.output_tokens = 0
            per_req = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
            spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
            if total > 0 and not new_reqs and per_req and all(
                    n == 1 + len(spec.get(r, ())) for r, n in per_req.items()):
                self._pending = (now, total, len(per_req))
        except Exception:  # timing is advisory: never fail a step over it
            self._pending = None
