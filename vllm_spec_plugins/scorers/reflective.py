"""Reflective verification: our own design from the abstract of "Think Before
You Accept" (arXiv 2505.18629; the paper's text and code are not reachable
here, so the probe, how both distributions are obtained and the fusion rule
below are this package's choices, not the paper's).

How both distributions come from one forward pass. vLLM verifies a draft
chain in one target pass and throws away the KV of every rejected position.
So a request's draft ``d1..dn`` is sent for verification as

    d1 .. dn  P1 .. Pm  d1 .. dn

where ``P`` is the probe (a short text, by default "the same again, with any
mistake corrected"). The target's distribution predicting ``dj`` in the first
copy is the *original* one; predicting ``dj`` in the second copy, after it has
read the whole draft and the probe, is the *reflective* one: the target
restating the draft, asked to fix mistakes, keeps a token it finds right and
moves away from one it finds wrong. The probe and the second copy are never
accepted (the scorer caps the chain at ``n``), so their KV is overwritten by
the next step, like any rejected draft.

Fusion: ``log f = (1 - w) log p_orig + w log p_refl``; draft token ``dj`` is
acceptable when it is the argmax of ``f`` and ``p_orig(dj) >= min_target_prob``
(never a token the target itself finds implausible). Standard acceptances
stand (the OR rule of ``base.relaxed_chains``); the token emitted at the stop
is the target's own (argmax of ``p_orig``, or a sample of it).

Cost per step: the verified chain is ``2n + m`` tokens for an ``n``-token
draft (standard: ``n``), so with ``num_speculative_tokens = k`` a draft is at
most ``(k - m) // 2`` tokens long. Plain torch, no vLLM import.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .base import Scorer, VerifyBatch

DEFAULT_PROBE = "\nCorrected:\n"


def max_real_draft(k: int, probe_len: int) -> int:
    """The longest draft that fits ``k`` verified tokens once extended."""
    return max(0, (int(k) - int(probe_len)) // 2)


def extend_draft(draft: Sequence[int], probe_ids: Sequence[int]) -> list[int]:
    """``d + probe + d`` (see the module note)."""
    d = [int(x) for x in draft]
    return d + [int(x) for x in probe_ids] + d


class ReflectiveScorer(Scorer):
    name = "reflective"
    lossless = False
    needs_reflection = True

    def __init__(self, probe_ids: Sequence[int], fusion_weight: float = 0.5,
                 min_target_prob: float = 0.05) -> None:
        if not probe_ids:
            raise ValueError("the reflective probe is empty")
        self.probe_ids = [int(x) for x in probe_ids]
        self.fusion_weight = float(fusion_weight)
        self.min_log_prob = math.log(float(min_target_prob)) if min_target_prob > 0 else -math.inf

    def acceptable(self, batch: VerifyBatch) -> torch.Tensor:
        T = int(batch.draft_token_ids.shape[0])
        out = torch.zeros(T, dtype=torch.bool)
        if T == 0 or batch.reflective_logits is None:
            return out
        idx = batch.consulted()
        if idx.numel() == 0:
            return out
        dev = batch.target_logits.device
        w = self.fusion_weight
        lp_o = torch.log_softmax(batch.target_logits[idx.to(dev)].float(), dim=-1)
        lp_r = torch.log_softmax(batch.reflective_logits[idx.to(dev)].float(), dim=-1)
        fused = (1.0 - w) * lp_o + w * lp_r
        d = batch.draft_token_ids[idx.to(batch.draft_token_ids.device)].long().view(-1, 1)
        d = d.to(dev)
        ok = fused.argmax(dim=-1) == d.view(-1)
        ok &= lp_o.gather(1, d).view(-1) >= self.min_log_prob
        out[idx] = ok.to("cpu")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "fusion_weight": self.fusion_weight,
                "probe_tokens": len(self.probe_ids),
                "min_target_prob": round(math.exp(self.min_log_prob), 6)}
