"""A proposer that checks what the integration layer's top-k capture hands it.

Used as ``{"method": "topk_probe_proposer:TopkProbeProposer"}``. It drafts by
prompt lookup (so some drafts are accepted and some rejected) and, under greedy
decoding, checks every ``on_target_topk`` call against the tokens that step
then emits: the target's top-1 at window position j must be the j-th emitted
token (accepted drafts are argmax tokens, and so is the final one). Results are
in ``self.stats`` (read through ``drafter_snapshot``)."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from vllm_spec_plugins.proposers.base import Proposer


class TopkProbeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    topk: int = 4


class TopkProbeProposer(Proposer):
    Config = TopkProbeConfig

    def __init__(self, config: TopkProbeConfig, num_speculative_tokens: int) -> None:
        self.target_topk = config.topk
        self.k = num_speculative_tokens
        self.ctx: dict[str, list[int]] = {}
        self.last_draft: dict[str, list[int]] = {}
        self.pending: dict[str, tuple] = {}
        self.stats = {"calls": 0, "positions": 0, "checked": 0, "with_drafts": 0,
                      "violations": 0, "first_violation": ""}

    def _violation(self, what: str) -> None:
        self.stats["violations"] += 1
        if not self.stats["first_violation"]:
            self.stats["first_violation"] = what

    def on_request_start(self, req_id, prompt_token_ids):
        self.ctx[req_id] = [int(t) for t in prompt_token_ids]

    def on_target_topk(self, req_id, input_token_ids, topk_ids, topk_probs):
        s = self.stats
        s["calls"] += 1
        s["positions"] += len(input_token_ids)
        ctx = self.ctx.get(req_id)
        if topk_ids.shape != (len(input_token_ids), self.target_topk) or topk_probs.shape != topk_ids.shape:
            self._violation(f"shapes {topk_ids.shape} {topk_probs.shape} for {len(input_token_ids)} inputs")
        if ctx is None or int(input_token_ids[0]) != ctx[-1]:
            self._violation("first input is not the last token before the window")
        drafted = list(map(int, input_token_ids[1:]))
        if drafted:
            s["with_drafts"] += 1
        if drafted != self.last_draft.get(req_id, [])[:len(drafted)]:
            self._violation(f"window drafts {drafted} are not the proposed {self.last_draft.get(req_id)}")
        if np.any(np.diff(topk_probs, axis=1) > 1e-6) or np.any(topk_probs.sum(axis=1) > 1.0 + 1e-4):
            self._violation("probabilities not sorted or sum above 1")
        self.pending[req_id] = (input_token_ids.copy(), topk_ids.copy())

    def on_tokens(self, req_id, new_token_ids):
        new = [int(t) for t in new_token_ids]
        got = self.pending.pop(req_id, None)
        if got is not None:
            inputs, ids = got
            # emitted token j must be the target's argmax after window input j
            for j, tok in enumerate(new[:len(inputs)]):
                self.stats["checked"] += 1
                if int(ids[j, 0]) != tok:
                    self._violation(f"position {j}: top-1 {int(ids[j, 0])} but emitted {tok}")
        self.ctx.setdefault(req_id, []).extend(new)

    def propose(self, req_id, context, max_tokens):
        ctx = [int(t) for t in context]
        out: list[int] = []
        if len(ctx) >= 3:
            key = ctx[-2:]
            for s in range(len(ctx) - 3, -1, -1):
                if ctx[s:s + 2] == key:
                    out = ctx[s + 2:s + 2 + min(max_tokens, self.k)]
                    break
        self.last_draft[req_id] = out
        return out

    def on_request_finish(self, req_id, aborted=False):
        for d in (self.ctx, self.last_draft, self.pending):
            d.pop(req_id, None)

    def num_active_requests(self):
        return len(self.ctx)
