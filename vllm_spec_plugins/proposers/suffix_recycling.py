"""Suffix tree + Token Recycling, switched per request per step (the idea of
SAM-Decoding, arXiv 2411.10666: a retrieval drafter when the text repeats, a
general drafter otherwise).

* The context repeats itself (code edits, quoting, agent loops): a long
  match of the context's suffix in the suffix trees predicts the next tokens
  far better than any one-token-of-context statistic. Use the suffix draft
  when its match is at least ``min_suffix_match`` tokens and it drafted
  something.
* Otherwise, Token Recycling's matrix of the target's own past top-k.
* If Token Recycling has nothing either (cold matrix), the suffix draft of a
  shorter match is still better than no draft: it already passed the suffix
  tree's own probability threshold.

Both halves see every lifecycle hook, so either is ready when chosen: the
request state is a :class:`HybridState` holding each half's own state.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import numpy as np

from vllm_spec_plugins.config import SuffixRecyclingConfig

from .base import Proposer, RequestState, ScoredDraft
from .suffix_tree import SUFFIX_STRATA, SuffixTreeProposer, _Request, suffix_stratum
from .token_recycling import TokenRecyclingProposer

__all__ = ["SuffixRecyclingConfig", "SuffixRecyclingProposer", "HybridState", "state_paths"]


#: Calibration stratum of Token Recycling's drafts (after the suffix tree's).
RECYCLING_STRATUM = SUFFIX_STRATA


def state_paths(path: str) -> tuple[str, str]:
    """Files of a saved hybrid state: ``<stem>.suffix.npz`` (suffix tree's
    global cache) and ``<stem>.recycling.npz`` (the matrix), where stem is
    ``path`` without a trailing ``.npz``. Two files because each half keeps
    its own format and atomic save; they are independent, so a crash
    between the two writes leaves two valid (if unequally fresh) files."""
    stem = path[:-4] if path.endswith(".npz") else path
    return stem + ".suffix.npz", stem + ".recycling.npz"


class HybridState(NamedTuple):
    """Per-request state of :class:`SuffixRecyclingProposer`: each half's
    own (what its ``start_request`` returned)."""

    suffix: Optional[_Request]
    recycling: RequestState


def _halves(state: Optional[HybridState]) -> tuple[Optional[_Request], RequestState]:
    return (None, None) if state is None else (state.suffix, state.recycling)


class SuffixRecyclingProposer(Proposer):
    """Suffix-tree draft on a long context match, Token Recycling otherwise."""

    def __init__(self, config: SuffixRecyclingConfig, num_speculative_tokens: int) -> None:
        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))
        self.suffix = SuffixTreeProposer(config.suffix_tree, num_speculative_tokens)
        self.recycling = TokenRecyclingProposer(config.token_recycling, num_speculative_tokens)
        self.target_topk = self.recycling.target_topk
        self._min_match = int(config.min_suffix_match)
        #: Rows drafted by each rule since construction (diagnostics):
        #: suffix_tree = long match; token_recycling = short/no match;
        #: suffix_tree_fallback = short match, recycling had nothing;
        #: none = neither drafted anything.
        self.choice_counts = {"suffix_tree": 0, "token_recycling": 0,
                              "suffix_tree_fallback": 0, "none": 0}

    # ---------------------------------------------------------- lifecycle
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> HybridState:
        """Both halves' states (each half's start_request only builds its own,
        so this may run on another thread too)."""
        return HybridState(self.suffix.start_request(req_id, prompt_token_ids),
                           self.recycling.start_request(req_id, prompt_token_ids))

    def on_tokens(self, state: Optional[HybridState], new_token_ids: np.ndarray) -> None:
        s, r = _halves(state)
        self.suffix.on_tokens(s, new_token_ids)
        self.recycling.on_tokens(r, new_token_ids)

    def on_target_topk(self, state: Optional[HybridState], input_token_ids: np.ndarray,
                       topk_ids: np.ndarray, topk_probs: np.ndarray) -> None:
        s, r = _halves(state)
        self.suffix.on_target_topk(s, input_token_ids, topk_ids, topk_probs)
        self.recycling.on_target_topk(r, input_token_ids, topk_ids, topk_probs)

    def finish_request(self, state: Optional[HybridState], aborted: bool = False) -> None:
        s, r = _halves(state)
        try:
            self.suffix.finish_request(s, aborted)
        finally:
            self.recycling.finish_request(r, aborted)

    # ------------------------------------------------------------ sharing
    def enable_sharing(self) -> None:
        self.suffix.enable_sharing()
        self.recycling.enable_sharing()

    def export_shared(self) -> Optional[dict]:
        out = {**(self.suffix.export_shared() or {}), **(self.recycling.export_shared() or {})}
        return out or None

    def import_shared(self, payload: dict) -> None:
        self.suffix.import_shared(payload)
        self.recycling.import_shared(payload)

    @property
    def stats(self) -> dict[str, object]:
        """Diagnostics for ``drafter_snapshot``: choice counts and the matrix's."""
        return {**self.choice_counts, "matrix": self.recycling.stats}

    def set_step_cost(self, model) -> None:
        self.suffix.set_step_cost(model)
        self.recycling.set_step_cost(model)

    def warmup(self) -> None:
        self.suffix.warmup()
        self.recycling.warmup()

    # ------------------------------------------------------------ drafting
    def propose(self, state: Optional[HybridState], context: np.ndarray,
                max_tokens: int) -> list[int]:
        return self.propose_batch([(state, context, max_tokens)])[0]

    def propose_batch(self, batch: Sequence[tuple[Optional[HybridState], np.ndarray, int]]
                      ) -> list[list[int]]:
        return [d.tokens for d in self._propose(batch, None)]

    def propose_scored_batch(self, batch: Sequence[tuple[Optional[HybridState], np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        """Each row's draft from the half that drafted it, with that half's
        estimates; Token Recycling's drafts get their own calibration stratum
        (after the suffix tree's)."""
        return self._propose(batch, price)

    def _propose(self, batch, price: Optional[float]) -> list[ScoredDraft]:
        out: list[ScoredDraft] = [ScoredDraft([], []) for _ in batch]
        fallback: dict[int, ScoredDraft] = {}
        rest: list[int] = []
        for i, (state, ctx, k) in enumerate(batch):
            toks, _score, match_len, probs, src = self.suffix.draft_row(_halves(state)[0], ctx, k)
            d = ScoredDraft(toks.tolist(), probs.tolist(), suffix_stratum(match_len, src))
            if d.tokens and match_len >= self._min_match:
                out[i] = d
                self.choice_counts["suffix_tree"] += 1
            else:
                if d.tokens:
                    fallback[i] = d
                rest.append(i)
        if rest:
            sub = [(_halves(batch[i][0])[1], batch[i][1], batch[i][2]) for i in rest]
            if price is None:
                # The verification cost of a drafted token depends on the whole step.
                price = self.recycling.draft_threshold(len(batch))
            drafts = self.recycling.propose_scored_batch(sub, price)
            for i, d in zip(rest, drafts):
                if d.tokens:
                    out[i] = ScoredDraft(d.tokens, d.probs, RECYCLING_STRATUM)
                    self.choice_counts["token_recycling"] += 1
                elif i in fallback:
                    out[i] = fallback[i]
                    self.choice_counts["suffix_tree_fallback"] += 1
                else:
                    self.choice_counts["none"] += 1
        return out

    # --------------------------------------------------------- persistence
    def save_state(self) -> bool:
        """Each half to the path its own settings name (suffix_tree.cache_path,
        token_recycling.matrix_path), where it also loads from at start."""
        saved_suffix = self.suffix.save_state()
        saved_recycling = self.recycling.save_state()
        return saved_suffix or saved_recycling

    def save(self, path: str) -> None:
        """Write both halves' state, see :func:`state_paths`."""
        suffix_path, recycling_path = state_paths(path)
        self.suffix.save(suffix_path)
        self.recycling.save(recycling_path)

    def load(self, path: str) -> bool:
        """Load both halves from :func:`state_paths`; a missing or bad file
        logs a warning and leaves that half as it was. True if both loaded."""
        suffix_path, recycling_path = state_paths(path)
        ok_suffix = self.suffix.load(suffix_path)
        ok_recycling = self.recycling.load(recycling_path)
        return ok_suffix and ok_recycling
