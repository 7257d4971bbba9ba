"""A proposer that fails on purpose, to test that failures cost only drafts.

Used as ``{"method": "flaky_proposer:FlakyProposer"}`` (custom-class form)."""

from __future__ import annotations

import numpy as np

from vllm_spec_plugins.config import SuffixTreeConfig
from vllm_spec_plugins.proposers.suffix_tree import SuffixTreeProposer


class FlakyProposer(SuffixTreeProposer):
    Config = SuffixTreeConfig

    def __init__(self, config, num_speculative_tokens):
        super().__init__(config, num_speculative_tokens)
        self.calls = 0

    def start_request(self, req_id: str, prompt_token_ids: np.ndarray):
        if "boom" in req_id:
            raise RuntimeError("injected failure in start_request")
        return super().start_request(req_id, prompt_token_ids)

    def propose(self, state, context, max_tokens):
        self.calls += 1
        if self.calls % 3 == 0:
            raise RuntimeError("injected failure in propose")
        return super().propose(state, context, max_tokens)

    def propose_batch(self, batch):
        # Fail the whole batch every other step, so the per-row retry path runs too.
        if self.calls % 2 == 1:
            self.calls += 1
            raise RuntimeError("injected batch failure")
        return [self.propose(s, c, k) for s, c, k in batch]

    def propose_scored_batch(self, batch, price=None):
        # The drafter's entry point: the same failures (a whole batch every other
        # step, then every third row on the drafter's row-by-row retry).
        if len(batch) > 1 and self.calls % 2 == 1:
            self.calls += 1
            raise RuntimeError("injected batch failure")
        out = []
        for row in batch:
            self.calls += 1
            if self.calls % 3 == 0:
                raise RuntimeError("injected failure in propose")
            out.append(super().propose_scored_batch([row], price)[0])
        return out
