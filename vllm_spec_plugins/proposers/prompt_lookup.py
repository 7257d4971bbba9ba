"""N-gram prompt lookup: copy what followed the most recent earlier
occurrence of the context's last n tokens (Prompt Lookup Decoding; vLLM's
``ngram`` method does the same). Here it is a cascade level: the cheapest
proposal a draft model can verify. Plain numpy, no per-request state.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from vllm_spec_plugins.config import PromptLookupConfig

from .base import Proposer, ScoredDraft

__all__ = ["PromptLookupConfig", "PromptLookupProposer", "lookup"]

#: Calibration strata: one per matched n-gram length (a longer match copies
#: more reliably), 0..MAX_STRATA-1.
MAX_STRATA = 16


def lookup(context: np.ndarray, k: int, min_n: int, max_n: int) -> tuple[np.ndarray, int]:
    """(up to ``k`` tokens that followed the latest earlier occurrence of the
    context's last n tokens, n) for the longest n in [min_n, max_n] that
    occurs; (empty, 0) if none does."""
    ctx = np.asarray(context)
    L = int(ctx.shape[0])
    if k <= 0 or L < min_n + 1:
        return ctx[:0], 0
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        tail = ctx[L - n:]
        # Candidate starts s < L-n where ctx[s:s+n] == tail: match the first
        # token with numpy, then check the rest for the few candidates.
        cand = np.flatnonzero(ctx[:L - n] == tail[0])
        for s in cand[::-1]:  # the most recent occurrence first
            s = int(s)
            if np.array_equal(ctx[s:s + n], tail):
                follow = ctx[s + n:s + n + k]
                if len(follow):
                    return follow, n
    return ctx[:0], 0


class PromptLookupProposer(Proposer):
    """Drafts by n-gram lookup in the request's own context."""

    def __init__(self, config: PromptLookupConfig, num_speculative_tokens: int) -> None:
        self.config = config
        self.num_speculative_tokens = max(0, int(num_speculative_tokens))

    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> None:
        return None  # the context is the state

    def on_tokens(self, state: None, new_token_ids: np.ndarray) -> None:
        pass

    def propose(self, state: None, context: np.ndarray, max_tokens: int) -> list[int]:
        return self.draft_row(context, max_tokens).tokens

    def draft_row(self, context: np.ndarray, max_tokens: int) -> ScoredDraft:
        c = self.config
        k = min(int(max_tokens), self.num_speculative_tokens)
        ctx = np.asarray(context)[-c.max_context:]
        toks, n = lookup(ctx, k, c.min_n, c.max_n)
        if not len(toks):
            return ScoredDraft([], [])
        # No counts behind a lookup: a flat prior the draft budget calibrates
        # per matched length (its stratum).
        return ScoredDraft([int(t) for t in toks], [0.5] * len(toks), min(n, MAX_STRATA - 1))

    def propose_scored_batch(self, batch: Sequence[tuple[None, np.ndarray, int]],
                             price: Optional[float] = None) -> list[ScoredDraft]:
        return [self.draft_row(ctx, k) for _, ctx, k in batch]
