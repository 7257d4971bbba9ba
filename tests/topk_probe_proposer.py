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


class _ProbeState:
    """One request's: its tokens so far, the last draft, and the top-k of this
    step waiting for the step's emitted tokens."""

    __slots__ = ("ctx", "last_draft", "pending")

    def __init__(self, prompt_token_ids) -> None:
        self.ctx: list[int] = [int(t) for t in prompt_token_ids]
        self.last_draft: list[int] = []
        self.pending: tuple | None = None


class TopkProbeProposer(Proposer):
    Config = TopkProbeConfig

    def __init__(self, config: TopkProbeConfig, num_speculative_tokens: int) -> None:
        self.target_topk = config.topk
        self.k = num_speculative_tokens
        self.stats = {"calls": 0, "positions": 0, "checked": 0, "with_drafts": 0,
                      "violations": 0, "first_violation": ""}

    def _violation(self, what: str) -> None:
        self.stats["violations"] += 1
        if not self.stats["first_violation"]:
            self.stats["first_violation"] = what

    def start_request(self, req_id, prompt_token_ids):
        return _ProbeState(prompt_token_ids)

    def on_target_topk(self, state, input_token_ids, topk_ids, topk_probs):
        s = self.stats
        s["calls"] += 1
        s["positions"] += len(input_token_ids)
        if topk_ids.shape != (len(input_token_ids), self.target_topk) or topk_probs.shape != topk_ids.shape:
            self._violation(f"shapes {topk_ids.shape} {topk_probs.shape} for {len(input_token_ids)} inputs")
        if state is None or not state.ctx or int(input_token_ids[0]) != state.ctx[-1]:
            self._violation("first input is not the last token before the window")
        drafted = list(map(int, input_token_ids[1:]))
        if drafted:
            s["with_drafts"] += 1
        last_draft = state.last_draft if state is not None else []
        if drafted != last_draft[:len(drafted)]:
            self._violation(f"window drafts {drafted} are not the proposed {last_draft}")
        if np.any(np.diff(topk_probs, axis=1) > 1e-6) or np.any(topk_probs.sum(axis=1) > 1.0 + 1e-4):
            self._violation("probabilities not sorted or sum above 1")
        if state is not None:
            state.pending = (input_token_ids.copy(), topk_ids.copy())

    def on_tokens(self, state, new_token_ids):
        if state is None:
            return
        new = [int(t) for t in new_token_ids]
        got, state.pending = state.pending, None
        if got is not None:
            inputs, ids = got
            # emitted token j must be the target's argmax after window input j
            for j, tok in enumerate(new[:len(inputs)]):
                self.stats["checked"] += 1
                if int(ids[j, 0]) != tok:
                    self._violation(f"position {j}: top-1 {int(ids[j, 0])} but emitted {tok}")
        state.ctx.extend(new)

    def propose(self, state, context, max_tokens):
        ctx = [int(t) for t in context]
        out: list[int] = []
        if len(ctx) >= 3:
            key = ctx[-2:]
            for s in range(len(ctx) - 3, -1, -1):
                if ctx[s:s + 2] == key:
                    out = ctx[s + 2:s + 2 + min(max_tokens, self.k)]
                    break
        if state is not None:
            state.last_draft = out
        return out

    def finish_request(self, state, aborted=False):
        if state is not None:
            state.pending = None
