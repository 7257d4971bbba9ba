"""What one more drafted token costs, measured on the running engine.

A drafted token is worth verifying only if its chance of being accepted
beats what verifying it costs. That cost depends on the hardware, the model
and the batch: on a GPU at batch 1 a few extra verified tokens are almost
free; on a CPU, or at a large batch, each one adds real time to the step.
A fixed threshold is right on one machine only.

:class:`StepCostModel` learns the cost from the steps themselves. The
integration layer reports every pure decode step: tokens verified ``N``
(rows + drafts), rows, output tokens, and the step's wall time. A
least-squares line with exponential forgetting fits ``time = a + b * N``;
``b`` is the time of one more verified token.

Price of a drafted token, in accepted tokens: adding a token whose
(estimated) acceptance probability is ``q`` to a step that emits ``E``
tokens in time ``T`` raises throughput iff ``(E + q) / (T + b) > E / T``,
i.e. ``q > b * E / T``. ``E`` and ``T`` are predicted for the step at hand
from the recent output per row and drafts per row, so the price rises with
the batch by itself (more rows share the same ``a``).

Until the fit is trustworthy (enough steps, enough spread in ``N``, a small
standard error on the price), :meth:`token_price` returns None and the
proposer keeps its configured threshold. Plain Python, no vLLM imports.
"""

from __future__ import annotations

import math

__all__ = ["StepCostModel"]


class StepCostModel:
    """Online fit of step time vs verified tokens; prices a drafted token."""

    def __init__(self, half_life_steps: float = 200.0, min_steps: int = 32,
                 max_price_error: float = 0.05, min_price: float = 0.01,
                 max_price: float = 0.95, max_step_seconds: float = 30.0) -> None:
        self.decay = 0.5 ** (1.0 / float(half_life_steps))
        self.min_steps = int(min_steps)
        self.max_price_error = float(max_price_error)
        self.min_price = float(min_price)
        self.max_price = float(max_price)
        self.max_step_seconds = float(max_step_seconds)
        # Exponentially weighted sums over observations (x = N, y = seconds).
        self._w = self._sx = self._sxx = self._sy = self._sxy = self._syy = 0.0
        self._w2 = 0.0  # sum of squared weights (effective sample size)
        # Exponentially weighted per-row means for predicting E and N.
        self._rows = self._out = self._drafts = 0.0
        self.steps = 0       # observations accepted
        self.rejected = 0    # outliers and impossible values dropped

    # ----------------------------------------------------------- fitting
    def observe(self, tokens: int, rows: int, output_tokens: int, seconds: float) -> bool:
        """One pure decode step. Returns whether it was used."""
        if (rows <= 0 or tokens < rows or output_tokens < 0 or not math.isfinite(seconds)
                or seconds <= 0.0 or seconds > self.max_step_seconds):
            self.rejected += 1
            return False
        fit = self._fit()
        if fit is not None and self.steps >= self.min_steps:
            a, b, _sd, _ = fit
            predicted = a + b * tokens
            if predicted > 0 and seconds > 4.0 * predicted:
                # A pause (GC, another process, an idle gap): not the model's cost.
                self.rejected += 1
                return False
        d = self.decay
        x, y = float(tokens), float(seconds)
        self._w = self._w * d + 1.0
        self._w2 = self._w2 * d * d + 1.0
        self._sx = self._sx * d + x
        self._sxx = self._sxx * d + x * x
        self._sy = self._sy * d + y
        self._sxy = self._sxy * d + x * y
        self._syy = self._syy * d + y * y
        self._rows = self._rows * d + rows
        self._out = self._out * d + output_tokens
        self._drafts = self._drafts * d + (tokens - rows)
        self.steps += 1
        return True

    def _fit(self) -> tuple[float, float, float, float] | None:
        """(a, b, standard error of b, residual sd) or None if degenerate."""
        w = self._w
        if w <= 0.0:
            return None
        mx, my = self._sx / w, self._sy / w
        vx = self._sxx / w - mx * mx
        if vx <= 1e-9:
            return None
        cov = self._sxy / w - mx * my
        b = cov / vx
        a = my - b * mx
        resid = max(0.0, self._syy / w - my * my - b * cov)
        n_eff = (w * w / self._w2) if self._w2 > 0 else 0.0
        if n_eff <= 2.0:
            return None
        se_b = math.sqrt(resid / (vx * (n_eff - 2.0)))
        return a, b, se_b, math.sqrt(resid)

    # ----------------------------------------------------------- pricing
    def _price(self, rows: int, b: float, a: float) -> float:
        w = self._w
        rows = max(1, int(rows))
        out_per_row = self._out / self._rows if self._rows > 0 else 1.0
        drafts_per_row = self._drafts / self._rows if self._rows > 0 else 0.0
        e = rows * max(out_per_row, 1.0)
        t = a + b * rows * (1.0 + drafts_per_row)
        if t <= 0.0 or w <= 0.0:
            return math.inf
        return b * e / t

    def token_price(self, rows: int = 1) -> float | None:
        """Acceptance probability a drafted token needs to pay for its
        verification in a step of ``rows`` rows; None until measured well."""
        if self.steps < self.min_steps:
            return None
        fit = self._fit()
        if fit is None:
            return None
        a, b, se_b, _ = fit
        b_pos = max(b, 0.0)
        price = self._price(rows, b_pos, a)
        if not math.isfinite(price):
            return None
        # Standard error of the price, by the slope's error (it dominates).
        err = abs(self._price(rows, b_pos + se_b, a) - price)
        if err > self.max_price_error:
            return None
        return min(self.max_price, max(self.min_price, price))

    @property
    def stats(self) -> dict[str, object]:
        fit = self._fit()
        out: dict[str, object] = {"steps": self.steps, "rejected": self.rejected}
        if fit is not None:
            a, b, se_b, sd = fit
            out.update(step_ms=round(a * 1e3, 3), token_ms=round(b * 1e3, 4),
                       token_ms_se=round(se_b * 1e3, 4), resid_ms=round(sd * 1e3, 3))
        price = self.token_price(1)
        out["price_1_row"] = None if price is None else round(price, 4)
        return out
