"""What one more drafted token costs, measured on the running engine.

A drafted token is worth verifying only if its chance of being accepted
beats what verifying it costs. That cost depends on the hardware, the model
and the batch: on a GPU at batch 1 a few extra verified tokens are almost
free; on a CPU, or at a large batch, each one adds real time to the step.
A fixed threshold is right on one machine only.

:class:`StepCostModel` learns the cost from the steps themselves. The
integration layer reports every pure decode step: tokens verified (rows +
drafts), rows, output tokens, and the step's wall time. A least-squares fit
with exponential forgetting, ``time = a + c * rows + b * drafts``, gives
``b``, the time of one more *drafted* token. Rows and drafts get separate
slopes because they cost different things: a row also pays sampling, output
processing and per-request bookkeeping. With one slope over all verified
tokens, a proposer that drafts almost nothing while the batch shrinks (as
requests finish) had the per-row cost charged to its drafts and was priced
out for good.

Price of a drafted token, in accepted tokens: adding a token whose
(estimated) acceptance probability is ``q`` to a step that emits ``E``
tokens in time ``T`` raises throughput iff ``(E + q) / (T + b) > E / T``,
i.e. ``q > b * E / T``. ``E`` and ``T`` are predicted for the step at hand
from the recent output per row and drafts per row, so the price rises with
the batch by itself (more rows share the same ``a``).

Until the fit is trustworthy (enough steps, drafts that vary independently
of the rows, a small standard error on the price), :meth:`token_price`
returns None; :meth:`needs_exploration` then says whether only the draft
slope is missing, so the caller can send drafts on a few steps to measure it
(the draft budget does; see integration/draft_budget.py). While the row
count never varies (batch 1), ``c`` cannot be told from ``a`` and a row is
taken to cost what a drafted token costs when pricing another row count.
Plain Python, no vLLM imports.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

__all__ = ["StepCostModel", "StepCostFit"]

#: Below this weighted variance a regressor is taken as constant.
_MIN_VARIANCE = 1e-6


class StepCostFit(NamedTuple):
    a: float                 # seconds per step at zero rows and drafts
    row_s: float             # seconds per row (= draft_s when rows never varied)
    draft_s: float           # seconds per drafted token
    draft_s_se: float        # standard error of draft_s
    resid_s: float           # residual standard deviation
    rows_varied: bool        # whether row_s was measured rather than assumed


class StepCostModel:
    """Online fit of step time vs rows and drafted tokens; prices a drafted token."""

    def __init__(self, half_life_steps: float = 200.0, min_steps: int = 32,
                 max_price_error: float = 0.05, min_price: float = 0.01,
                 max_price: float = 0.95, max_step_seconds: float = 30.0,
                 throughput_half_life_steps: float = 16.0) -> None:
        self.decay = 0.5 ** (1.0 / float(half_life_steps))
        # What a second is worth follows the traffic of the last few steps,
        # not the fit's long memory: after a run of well-drafted requests
        # (copying code: many tokens a second) a second is worth less once
        # requests that draft poorly take over, and a drafter weighing its
        # own time must see that within a few steps.
        self.throughput_decay = 0.5 ** (1.0 / float(throughput_half_life_steps))
        self._recent_out = self._recent_s = 0.0
        self.min_steps = int(min_steps)
        self.max_price_error = float(max_price_error)
        self.min_price = float(min_price)
        self.max_price = float(max_price)
        self.max_step_seconds = float(max_step_seconds)
        # Exponentially weighted sums over observations
        # (r = rows, d = drafted tokens, y = seconds).
        self._w = self._w2 = 0.0  # weights and squared weights (effective sample size)
        self._sr = self._sd = self._sy = 0.0
        self._srr = self._srd = self._sdd = 0.0
        self._sry = self._sdy = self._syy = 0.0
        self._out = 0.0  # weighted output tokens, for E
        self.steps = 0       # observations accepted
        self.rejected = 0    # outliers and impossible values dropped

    # ----------------------------------------------------------- fitting
    def observe(self, tokens: int, rows: int, output_tokens: int, seconds: float) -> bool:
        """One pure decode step: ``tokens`` verified (rows + drafts). Returns
        whether it was used."""
        if (rows <= 0 or tokens < rows or output_tokens < 0 or not math.isfinite(seconds)
                or seconds <= 0.0 or seconds > self.max_step_seconds):
            self.rejected += 1
            return False
        drafts = tokens - rows
        fit = self._fit()
        if fit is not None and self.steps >= self.min_steps:
            predicted = fit.a + fit.row_s * rows + fit.draft_s * drafts
            if predicted > 0 and seconds > 4.0 * predicted:
                # A pause (GC, another process, an idle gap): not the model's cost.
                self.rejected += 1
                return False
        k = self.decay
        r, d, y = float(rows), float(drafts), float(seconds)
        self._w = self._w * k + 1.0
        self._w2 = self._w2 * k * k + 1.0
        self._sr = self._sr * k + r
        self._sd = self._sd * k + d
        self._sy = self._sy * k + y
        self._srr = self._srr * k + r * r
        self._srd = self._srd * k + r * d
        self._sdd = self._sdd * k + d * d
        self._sry = self._sry * k + r * y
        self._sdy = self._sdy * k + d * y
        self._syy = self._syy * k + y * y
        self._out = self._out * k + output_tokens
        kt = self.throughput_decay
        self._recent_out = self._recent_out * kt + output_tokens
        self._recent_s = self._recent_s * kt + y
        self.steps += 1
        return True

    def _fit(self) -> Optional[StepCostFit]:
        """The weighted least-squares fit, or None while the draft slope
        cannot be measured (drafts never varied apart from the rows)."""
        w = self._w
        if w <= 0.0:
            return None
        n_eff = (w * w / self._w2) if self._w2 > 0 else 0.0
        mr, md, my = self._sr / w, self._sd / w, self._sy / w
        vrr = self._srr / w - mr * mr
        vdd = self._sdd / w - md * md
        vrd = self._srd / w - mr * md
        cry = self._sry / w - mr * my
        cdy = self._sdy / w - md * my
        vyy = self._syy / w - my * my
        rows_varied = vrr > _MIN_VARIANCE
        if rows_varied:
            det = vrr * vdd - vrd * vrd
            # Drafts must vary beyond what the rows explain.
            if det <= _MIN_VARIANCE * vrr or n_eff <= 3.0:
                return None
            draft_s = (vrr * cdy - vrd * cry) / det
            row_s = (vdd * cry - vrd * cdy) / det
            resid = max(0.0, vyy - row_s * cry - draft_s * cdy)
            se = math.sqrt(resid * (vrr / det) / (n_eff - 3.0))
            a = my - row_s * mr - draft_s * md
        else:
            if vdd <= _MIN_VARIANCE or n_eff <= 2.0:
                return None
            draft_s = cdy / vdd
            resid = max(0.0, vyy - draft_s * cdy)
            se = math.sqrt(resid / (vdd * (n_eff - 2.0)))
            # Rows never varied: a row is taken to cost what a drafted token
            # does, and the intercept is what is left at the usual row count.
            row_s = draft_s
            a = my - draft_s * (mr + md)
        return StepCostFit(a, row_s, draft_s, se, math.sqrt(resid), rows_varied)

    # ----------------------------------------------------------- pricing
    def _price(self, rows: int, fit: StepCostFit, draft_s: float) -> float:
        rows = max(1, int(rows))
        per_row = self._sr if self._sr > 0 else 0.0
        out_per_row = self._out / per_row if per_row > 0 else 1.0
        drafts_per_row = self._sd / per_row if per_row > 0 else 0.0
        e = rows * max(out_per_row, 1.0)
        t = fit.a + max(fit.row_s, 0.0) * rows + draft_s * rows * drafts_per_row
        if t <= 0.0:
            return math.inf
        return draft_s * e / t

    def token_price(self, rows: int = 1) -> float | None:
        """Acceptance probability a drafted token needs to pay for its
        verification in a step of ``rows`` rows; None until measured well."""
        if self.steps < self.min_steps:
            return None
        fit = self._fit()
        if fit is None:
            return None
        draft_s = max(fit.draft_s, 0.0)
        price = self._price(rows, fit, draft_s)
        if not math.isfinite(price):
            return None
        # Standard error of the price, by the slope's error (it dominates).
        err = abs(self._price(rows, fit, draft_s + fit.draft_s_se) - price)
        if err > self.max_price_error:
            return None
        return min(self.max_price, max(self.min_price, price))

    def needs_exploration(self, rows: int = 1) -> bool:
        """True when enough steps were timed but the drafted token's cost is
        still unknown or too uncertain: only steps with drafts (of varying
        length) can measure it."""
        return self.steps >= self.min_steps and self.token_price(rows) is None

    def tokens_per_second(self) -> Optional[float]:
        """Output tokens per second of the last few pure decode steps
        (``E / T`` over them, half-life ``throughput_half_life_steps``,
        drafting time included): what a second of extra step time is worth
        now, for a drafter deciding whether more work pays."""
        if self.steps < 1 or self._recent_s <= 0.0:
            return None
        return self._recent_out / self._recent_s

    @property
    def stats(self) -> dict[str, object]:
        fit = self._fit()
        out: dict[str, object] = {"steps": self.steps, "rejected": self.rejected}
        if fit is not None:
            out.update(step_ms=round(fit.a * 1e3, 3),
                       row_ms=round(fit.row_s * 1e3, 4) if fit.rows_varied else None,
                       token_ms=round(fit.draft_s * 1e3, 4),
                       token_ms_se=round(fit.draft_s_se * 1e3, 4),
                       resid_ms=round(fit.resid_s * 1e3, 3))
        price = self.token_price(1)
        out["price_1_row"] = None if price is None else round(price, 4)
        return out
