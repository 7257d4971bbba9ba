"""The draft budget every proposer shares: draft a token only where it pays.

Verifying a drafted token costs step time; it pays back only if it is
accepted. ``StepCostModel`` (proposers/step_cost.py) measures on the running
engine what one more verified token costs and turns it into a *price*: the
acceptance probability a token needs so that the step's tokens per second
go up, for a step of the batch at hand (a bigger batch leaves less idle
compute, so the price rises with it).

Each proposer returns its draft with an estimate per token
(``ScoredDraft``: the probability a token is accepted given that the ones
before it were). Estimates are not probabilities yet: a suffix-tree count
ratio over two occurrences says 1.0 and is right far less often; one over a
long match says 0.6 and is right more often. :class:`AcceptanceCalibrator`
learns, online, what the engine really accepts for each kind of evidence
(the proposer's ``stratum``) and estimate bin, and corrects the estimates.

:class:`DraftBudget` then keeps, per row, the longest prefix whose tokens'
cumulative calibrated probability (the chance the token is reached *and*
accepted, i.e. its expected contribution) is at least the price: each kept
token adds more expected output than it costs. With no pay-off anywhere the
step drafts nothing, which costs what a step without speculation costs.

The price needs steps with drafts to be measured. Until it is, the price is
``fallback_price`` rising with the rows, which at a large batch can keep
every draft out, so nothing would ever be measured: one step in
``explore_every`` then prices drafts as at one row (bounded exploration).

The cut uses the calibrated estimate plus ``optimism`` standard errors of
it: a kind of evidence seen rarely is still tried (so it gets calibrated,
and the step-cost fit keeps seeing drafts), one proven to fail is not. On
logged SmolLM2 drafts this lost less at high prices than sending a raw draft
every few steps (the earlier rule), and kept as much where drafts pay.

With ``state_path`` set, the calibration is a state file like a proposer's:
saved by the drafter's ``StateSaver`` and loaded at start (one file per
method: strata mean different things to different proposers).

Plain Python and numpy; no vLLM imports (the drafter feeds it).
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

from vllm_spec_plugins.proposers.base import ScoredDraft, save_npz_atomic

#: Estimate bins of the calibration curve (equal width over [0, 1]).
N_BINS = 10
#: Strata a proposer may use (``ScoredDraft.stratum`` is clamped to this).
MAX_STRATA = 64
#: Decay the evidence once per this many observed tokens (cheap and smooth enough).
_DECAY_BATCH = 256
#: Version of the calibration state file.
STATE_FORMAT_VERSION = 1


class AcceptanceCalibrator:
    """Observed acceptance per (stratum, estimate bin), shrunk in two levels.

    A cell's estimate is ``(hits + w * prior) / (trials + w)``. Its prior is
    the proposer's estimate scaled by how its stratum has done so far,
    ``p * f_s`` with ``f_s = hits_s / sum of estimates_s`` over the stratum's
    tried tokens, itself shrunk toward the same ratio over every stratum. So a
    kind of evidence that has proven overconfident (a one-token suffix match
    says 0.9 and is accepted ~10% of the time) is discounted in every bin,
    including bins it has not been seen in yet, instead of each bin learning it
    alone. (Measured on logged SmolLM2 drafts: log loss 0.47 -> 0.39, and more
    accepted tokens per verified one at the same price.)
    """

    def __init__(self, prior_weight: float = 8.0, half_life_tokens: int = 4096) -> None:
        self.prior_weight = float(prior_weight)
        self._decay = 0.5 ** (_DECAY_BATCH / float(half_life_tokens))
        self.hits = np.zeros((MAX_STRATA, N_BINS))
        self.trials = np.zeros((MAX_STRATA, N_BINS))
        self.estimates = np.zeros((MAX_STRATA, N_BINS))  # sum of raw estimates tried
        self.observed_tokens = 0
        self._since_decay = 0

    @staticmethod
    def _bin(p: float) -> int:
        b = int(p * N_BINS)
        return N_BINS - 1 if b >= N_BINS else (0 if b < 0 else b)

    def stratum_ratio(self, stratum: int) -> float:
        """Accepted tokens per estimated one in ``stratum``, shrunk to all strata's."""
        w = self.prior_weight
        overall = (self.hits.sum() + w) / (self.estimates.sum() + w)
        return float((self.hits[stratum].sum() + w * overall)
                     / (self.estimates[stratum].sum() + w))

    def calibrated(self, stratum: int, probs: Sequence[float],
                   optimism: float = 0.0) -> list[float]:
        """Calibrated estimates, plus ``optimism`` standard errors of each."""
        return self.calibrated_with_bound(stratum, probs, optimism)[1]

    def calibrated_with_bound(self, stratum: int, probs: Sequence[float],
                              optimism: float) -> tuple[list[float], list[float]]:
        """(calibrated estimates, the same plus ``optimism`` standard errors),
        in one pass: the budget cuts on the second and expects the first."""
        w = self.prior_weight
        h, t = self.hits[stratum], self.trials[stratum]
        ratio = self.stratum_ratio(stratum)
        means, bounds = [], []
        for p in probs:
            b = self._bin(p)
            n = t[b] + w
            m = (h[b] + w * min(1.0, p * ratio)) / n
            means.append(m)
            bounds.append(min(1.0, m + optimism * math.sqrt(m * (1.0 - m) / n))
                          if optimism else m)
        return means, bounds

    def observe(self, stratum: int, probs: Sequence[float], verified: int,
                accepted: int) -> None:
        """``verified`` of the draft's tokens were verified and the first
        ``accepted`` of them accepted: token i was tried iff all before it
        were accepted (i <= accepted) and hit iff i < accepted."""
        n = min(len(probs), verified, accepted + 1)
        if n <= 0:
            return
        h, t, e = self.hits[stratum], self.trials[stratum], self.estimates[stratum]
        for i in range(n):
            b = self._bin(probs[i])
            t[b] += 1.0
            e[b] += probs[i]
            if i < accepted:
                h[b] += 1.0
        self.observed_tokens += n
        self._since_decay += n
        if self._since_decay >= _DECAY_BATCH:
            self._since_decay = 0
            self.hits *= self._decay
            self.trials *= self._decay
            self.estimates *= self._decay

    def state(self) -> dict[str, np.ndarray]:
        """The evidence as arrays (copies: the step may observe meanwhile)."""
        return {"hits": self.hits.copy(), "trials": self.trials.copy(),
                "estimates": self.estimates.copy(),
                "observed_tokens": np.int64(self.observed_tokens)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the evidence with ``state()``'s arrays; ValueError if they
        are not that (the current evidence is kept then)."""
        shape = (MAX_STRATA, N_BINS)
        loaded = {}
        for name in ("hits", "trials", "estimates"):
            a = np.asarray(arrays[name], dtype=np.float64)
            if a.shape != shape:
                raise ValueError(f"{name} has shape {a.shape}, expected {shape}")
            if not (np.isfinite(a).all() and a.min(initial=0.0) >= 0.0):
                raise ValueError(f"{name} must be finite and non-negative")
            loaded[name] = a
        if (loaded["hits"] > loaded["trials"] + 1e-9).any():
            raise ValueError("more hits than trials")
        self.hits, self.trials, self.estimates = loaded["hits"], loaded["trials"], loaded["estimates"]
        self.observed_tokens = int(arrays["observed_tokens"])

    def curve(self) -> dict[int, list[tuple[float, float, float]]]:
        """{stratum: [(bin low end, evidence, observed rate)]} for bins with evidence."""
        out: dict[int, list[tuple[float, float, float]]] = {}
        for s in np.nonzero(self.trials.sum(axis=1) >= 1.0)[0]:
            rows = []
            for b in range(N_BINS):
                t = self.trials[s, b]
                if t >= 1.0:
                    rows.append((b / N_BINS, round(float(t), 1),
                                 round(float(self.hits[s, b] / t), 3)))
            out[int(s)] = rows
        return out


class DraftRecord:
    """What was sent for one row, kept until the engine says what it accepted."""

    __slots__ = ("stratum", "probs", "expected")

    def __init__(self, stratum: int, probs: list[float], expected: float) -> None:
        self.stratum = stratum
        self.probs = probs
        self.expected = expected  # calibrated expected accepted tokens


class DraftBudget:
    """Cuts each row's draft where one more token no longer pays (module note)."""

    def __init__(self, config, cost_model, method: str = "") -> None:
        self.config = config
        self.enabled = bool(config.enabled)
        self.cost_model = cost_model
        self.method = method
        self.calibrator = AcceptanceCalibrator(config.prior_weight, config.half_life_tokens)
        self.last_price: Optional[float] = None
        self.state_path: Optional[str] = getattr(config, "state_path", None)
        self.loaded_tokens = 0  # observed tokens the loaded state file carried
        if self.state_path and os.path.exists(self.state_path):
            self.load(self.state_path)
        self.stats = {"steps": 0, "measured_price_steps": 0, "exploration_steps": 0,
                      "rows": 0, "rows_cut": 0, "rows_emptied": 0,
                      "proposed_tokens": 0, "kept_tokens": 0, "tokens_saved": 0,
                      "verified_rows": 0, "expected_accepted": 0.0, "accepted_tokens": 0}

    # -- per step ------------------------------------------------------------
    def fallback_price(self, rows: int) -> float:
        c = self.config
        return min(0.95, c.fallback_price * (1.0 + c.fallback_rows_slope * (max(1, rows) - 1)))

    def step_price(self, rows: int) -> float:
        """The price of a drafted token this step: measured, else the fallback."""
        self.stats["steps"] += 1
        model = self.cost_model
        measured = model.token_price(rows) if model is not None else None
        if measured is not None:
            self.stats["measured_price_steps"] += 1
            price = measured
        else:
            price = self.fallback_price(rows)
            every = self.config.explore_every
            if (every and model is not None and self.stats["steps"] % every == 0
                    and model.needs_exploration(rows)):
                # The draft slope is unmeasured: draft on this step as at one
                # row so the step-cost fit sees drafts (bounded: 1 step in N).
                self.stats["exploration_steps"] += 1
                price = min(price, self.config.fallback_price)
        self.last_price = price
        return price

    def cut(self, draft: ScoredDraft, price: float,
            max_tokens: Optional[int] = None) -> tuple[list[int], Optional[DraftRecord]]:
        """The prefix of ``draft`` worth verifying, and what to remember of it."""
        tokens = draft.tokens if max_tokens is None else draft.tokens[:max_tokens]
        n_in = len(tokens)
        if n_in == 0:
            return [], None
        raw = draft.probs
        raw = [1.0] * n_in if raw is None else [min(1.0, max(0.0, float(p)))
                                               for p in raw[:n_in]]
        stratum = min(max(int(draft.stratum), 0), MAX_STRATA - 1)
        if self.config.calibrate:
            mean, est = self.calibrator.calibrated_with_bound(stratum, raw,
                                                              self.config.optimism)
        else:
            est = mean = raw
        n, q, qm, expected = 0, 1.0, 1.0, 0.0
        for p, m in zip(est, mean):
            q *= p
            if self.enabled and q < price:
                break
            qm *= m
            expected += qm
            n += 1
        st = self.stats
        st["rows"] += 1
        st["proposed_tokens"] += n_in
        st["kept_tokens"] += n
        if n < n_in:
            st["rows_cut"] += 1
            st["tokens_saved"] += n_in - n
            if n == 0:
                st["rows_emptied"] += 1
        if n == 0:
            return [], None
        return tokens[:n], DraftRecord(stratum, raw[:n], expected)

    def observe(self, record: DraftRecord, verified: int, accepted: int) -> None:
        """The engine verified ``verified`` of the row's drafted tokens and
        accepted the first ``accepted``."""
        if verified <= 0:
            return  # not scheduled (preempted, or the scheduler dropped the drafts)
        accepted = max(0, min(int(accepted), verified, len(record.probs)))
        self.calibrator.observe(record.stratum, record.probs, verified, accepted)
        st = self.stats
        st["verified_rows"] += 1
        st["expected_accepted"] += record.expected
        st["accepted_tokens"] += accepted

    # -- state file ------------------------------------------------------------
    def save_state(self) -> bool:
        """Save the calibration to ``state_path`` (atomic); False if none is set."""
        if not self.state_path:
            return False
        save_npz_atomic(self.state_path, version=np.int64(STATE_FORMAT_VERSION),
                        method=np.array(self.method), **self.calibrator.state())
        return True

    def load(self, path: str) -> None:
        """Load a calibration saved by ``save_state``. ValueError naming the
        file and what is wrong (another method's file, a damaged one)."""
        def bad(msg: str) -> ValueError:
            return ValueError(f"{path}: {msg}; delete the file or set another "
                              "draft_budget.state_path")

        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {name: z[name] for name in z.files}
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - zip and format errors
            raise bad(f"not a draft-budget state file ({e})") from None
        missing = {"version", "method", "hits", "trials", "estimates",
                   "observed_tokens"} - set(arrays)
        if missing:
            raise bad(f"not a draft-budget state file (missing {sorted(missing)})")
        if int(arrays["version"]) != STATE_FORMAT_VERSION:
            raise bad(f"format version {int(arrays['version'])}, expected {STATE_FORMAT_VERSION}")
        saved_by = str(arrays["method"])
        if self.method and saved_by != self.method:
            raise bad(f"saved by method {saved_by!r}, this engine runs {self.method!r}")
        try:
            self.calibrator.load_state(arrays)
        except (ValueError, TypeError) as e:
            raise bad(f"damaged draft-budget state file ({e})") from None
        self.loaded_tokens = self.calibrator.observed_tokens

    def snapshot(self) -> dict[str, object]:
        st = dict(self.stats)
        st["expected_accepted"] = round(st["expected_accepted"], 1)
        st["enabled"] = self.enabled
        st["price"] = None if self.last_price is None else round(self.last_price, 4)
        cal = self.calibrator
        st["calibration"] = cal.curve()
        st["stratum_ratio"] = {s: round(cal.stratum_ratio(s), 3) for s in st["calibration"]}
        st["loaded_tokens"] = self.loaded_tokens
        return st
