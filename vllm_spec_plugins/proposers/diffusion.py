"""Diffusion drafter: one pass drafts a whole block (DiffuSpec / DEER style).

Each step, for every row, the masked-block drafter (block_drafter.py) reads
the tokens that joined the request's context since its last pass and fills a
block of masks after it in the same forward pass: a lattice of candidates per
position. The draft is a path through it: causal-consistency path search
(lattice_path.py) or each position's best candidate; its length follows the
request's adaptive draft length. The drafter's probability of each drafted
token goes to the shared draft budget as its acceptance estimate (the budget
calibrates it against what the engine accepts).

**Passes that do not pay are skipped.** A pass costs measured time; the
tokens it adds are measured too (accepted per pass, after the budget's cut).
With ``skip_unpaid_passes`` a step runs the pass only if those tokens, less
the budget's price for the tokens drafted, are worth more than the pass's
time at the engine's measured throughput; one step in ten runs it anyway so
both measures stay current. A skipped step drafts nothing: the target
decodes as without speculation.

**Losslessness.** Drafts are deterministic, so vLLM's rejection sampler
treats each as a point mass (q = 1): under random sampling each token is
accepted with the target's probability for it and a rejection resamples
from the target without it, which leaves the target's distribution as it is.

**Failures.** A pass that raises drafts nothing for its rows that step (the
requests go on; the error is counted and logged).

Plain Python/numpy/torch: no vLLM imports.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Optional, Sequence

import numpy as np

from vllm_spec_plugins.config import DiffusionConfig, resolve_drafter_path

from .base import Proposer, ScoredDraft
from .lattice_path import AdaptiveLength, ContextNgram, argmax_path, causal_consistent_path

__all__ = ["DiffusionConfig", "DiffusionProposer"]

logger = logging.getLogger("vllm_spec_plugins")

#: Draft positions tracked in the per-position statistics.
TRACKED_POSITIONS = 32
#: Share of would-be-skipped steps that run the pass anyway (keeps its measures current).
EXPLORE = 0.1
#: Smoothing of a pass's measured time and of the tokens it adds.
EMA = 0.1


class DiffusionState:
    __slots__ = ("lm", "ngram", "adl", "last")

    def __init__(self, lm, ngram: ContextNgram, adl: Optional[AdaptiveLength]) -> None:
        self.lm = lm
        self.ngram = ngram
        self.adl = adl
        self.last: Optional[list[int]] = None  # the last draft, scored by on_tokens


class DiffusionProposer(Proposer):
    """Drafts with a masked-block drafter (see module note)."""

    def __init__(self, config: DiffusionConfig, num_speculative_tokens: int) -> None:
        from .block_drafter import BlockDrafterRuntime

        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))
        self.runtime = BlockDrafterRuntime(
            resolve_drafter_path(config.drafter), config.dtype, config.max_context, config.max_cached_tokens,
            top_m=config.path_max_candidates)
        spec = self.runtime.spec
        self.vocab_size = spec.target.vocab_size
        #: What the drafter was made for; the integration layer checks it
        #: against the serving target at startup (state_files.check_made_for).
        self.made_for_target = {"name": spec.target.name,
                                "architecture": spec.target.architecture,
                                "hidden_size": spec.target.hidden_size,
                                "vocab_size": spec.target.vocab_size,
                                "num_hidden_layers": spec.target.num_layers}
        self.eos = tuple(int(e) for e in spec.training.get("eos_token_ids", []))
        self.max_length = min(self.num_speculative_tokens, self.runtime.block_size)
        self._step_cost = None
        self._price = 0.0
        self._rng = np.random.default_rng(0)
        self.explore = EXPLORE
        self.pass_seconds: Optional[float] = None  # per pass, smoothed
        self.pass_gain: Optional[float] = None     # accepted less priced tokens per row-pass
        self.drafted = np.zeros(TRACKED_POSITIONS, np.int64)
        self.accepted = np.zeros(TRACKED_POSITIONS, np.int64)
        self.counts = {"rows": 0, "passes": 0, "skipped_steps": 0, "errors": 0,
                       "path_changed_tokens": 0, "drafted_rows": 0}

    # ---------------------------------------------------------- lifecycle
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> DiffusionState:
        ng = ContextNgram(len(self.runtime.spec.draft_vocab))
        if self.config.path_search:
            ng.add(np.asarray(prompt_token_ids).tolist())
        adl = (AdaptiveLength(self.config.min_length, max(1, self.max_length))
               if self.config.adaptive_length else None)
        return DiffusionState(self.runtime.new_state(), ng, adl)

    def on_tokens(self, state: DiffusionState, new_token_ids: np.ndarray) -> None:
        new = np.asarray(new_token_ids).tolist()
        if self.config.path_search:
            state.ngram.add(new)
        last, state.last = state.last, None
        if not last:
            return
        acc = 0
        n = min(len(last), len(new))
        for i in range(n):
            p = min(i, TRACKED_POSITIONS - 1)
            self.drafted[p] += 1
            if int(new[i]) != last[i]:
                break
            self.accepted[p] += 1
            acc += 1
        if state.adl is not None:
            state.adl.update(len(last), acc)
        g = acc - self._price * len(last)
        self.pass_gain = g if self.pass_gain is None else self.pass_gain + EMA * (g - self.pass_gain)

    def finish_request(self, state: DiffusionState, aborted: bool = False) -> None:
        self.runtime.release(state.lm)
        state.lm = None

    # ------------------------------------------------------------ drafting
    def propose(self, state: DiffusionState, context: np.ndarray, max_tokens: int) -> list[int]:
        return self.propose_scored_batch([(state, context, max_tokens)])[0].tokens

    def _pass_pays(self) -> bool:
        """See the module note: measured gain per row against measured time."""
        if not self.config.skip_unpaid_passes or self.pass_seconds is None or self.pass_gain is None:
            return True
        fn = getattr(self._step_cost, "tokens_per_second", None)
        tps = fn() if fn is not None else None
        if not tps:
            return True
        return (self.pass_gain > self.pass_seconds * tps
                or self._rng.random() < self.explore)

    def propose_scored_batch(self, batch: Sequence[tuple[DiffusionState, np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        self._price = float(price) if price is not None else 0.0
        self.counts["rows"] += len(batch)
        out = [ScoredDraft([]) for _ in batch]
        rows = [i for i, (st, ctx, k) in enumerate(batch)
                if k > 0 and st.lm is not None and len(ctx) > 0]
        if not rows:
            return out
        if not self._pass_pays():
            self.counts["skipped_steps"] += 1
            return out
        lengths = {}
        for i in rows:
            st, _, k = batch[i]
            n = min(int(k), self.max_length)
            lengths[i] = min(n, st.adl.next()) if st.adl is not None else n
        t0 = time.perf_counter()
        try:
            # the block as long as the longest row needs (shorter = cheaper)
            ids, probs = self.runtime.draft([batch[i][0].lm for i in rows],
                                            [np.asarray(batch[i][1]) for i in rows],
                                            block=max(lengths.values()))
        except Exception:
            self.counts["errors"] += 1
            logger.warning("vllm-spec-plugins: the diffusion drafter failed; this step drafts "
                           "nothing for %d rows:\n%s", len(rows), traceback.format_exc())
            for i in rows:  # its caches may be half-written: read again next time
                batch[i][0].lm.drop()
            return out
        dt = time.perf_counter() - t0
        per_row = dt / len(rows)
        ps = self.pass_seconds
        self.pass_seconds = per_row if ps is None else ps + EMA * (per_row - ps)
        self.counts["passes"] += 1
        c = self.config
        for r, i in enumerate(rows):
            st = batch[i][0]
            n = lengths[i]
            if c.path_search:
                toks, qs = causal_consistent_path(
                    ids[r], probs[r], n, st.ngram, mass=c.path_mass,
                    max_candidates=c.path_max_candidates, beam=c.path_beam,
                    weight=c.path_weight, eos=self.eos)
                # the argmax path is column 0: count where the search left it
                changed = int(np.count_nonzero(ids[r, :len(toks), 0] != np.asarray(toks)))
                self.counts["path_changed_tokens"] += changed
            else:
                toks, qs = argmax_path(ids[r], probs[r], n, self.eos)
                changed = 0
            st.last = list(toks)
            self.counts["drafted_rows"] += 1 if toks else 0
            out[i] = ScoredDraft(list(toks), [max(1e-4, min(1.0, float(q))) for q in qs],
                                 1 if changed else 0)
        return out

    # ------------------------------------------------------------- the rest
    @property
    def stats(self) -> dict[str, Any]:
        n = int(np.max(np.flatnonzero(self.drafted), initial=-1)) + 1
        d, a = int(self.drafted.sum()), int(self.accepted.sum())
        rt = self.runtime.stats
        return {**self.counts, "drafted": d, "accepted": a,
                "acceptance": round(a / d, 3) if d else None,
                "drafted_per_position": self.drafted[:n].tolist(),
                "accepted_per_position": self.accepted[:n].tolist(),
                "pass_ms_per_row": None if self.pass_seconds is None
                else round(self.pass_seconds * 1e3, 3),
                "block_size": self.runtime.block_size,
                "drafter_layers": len(self.runtime.spec.layer_ids),
                "dtype": self.runtime.dtype,
                "read_tokens": rt["read_tokens"], "cached_tokens": rt["cached_tokens"],
                "evictions": rt["evictions"]}

    def prometheus_counters(self) -> list[tuple[str, str, dict, float]]:
        out = []
        for pos in np.flatnonzero(self.drafted):
            lab = {"position": str(int(pos) + 1)}
            out.append(("vsp_diffusion_drafted_tokens_total",
                        "Diffusion-drafter tokens drafted by draft position", lab,
                        int(self.drafted[pos])))
            out.append(("vsp_diffusion_accepted_tokens_total",
                        "Diffusion-drafter tokens accepted by draft position", lab,
                        int(self.accepted[pos])))
        out.append(("vsp_diffusion_skipped_steps_total",
                    "Steps whose drafter pass was skipped as not paying", {},
                    self.counts["skipped_steps"]))
        return out

    def set_step_cost(self, model) -> None:
        self._step_cost = model

    def warmup(self) -> None:
        self.runtime.warmup()

    def __repr__(self) -> str:
        return f"DiffusionProposer(drafter={self.config.drafter!r}, k={self.num_speculative_tokens})"
