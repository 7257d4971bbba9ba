"""The scorer interface: which draft tokens to accept, and the token after them.

Plain torch, no vLLM import. The integration layer (``integration/scoring.py``)
builds a :class:`VerifyBatch` from what vLLM's verification step already has
(the drafts, the target's processed logits, the standard rule's result and,
for a scorer that asks, the target's final hidden states) and writes
:func:`relaxed_chains`' result back as the step's output.

The rule every lossy scorer shares (Judge Decoding's OR rule): a draft token
is accepted if the standard rule accepts it OR the scorer calls it
acceptable; the chain stops at the first token neither accepts, and the
target's own token is emitted there. A row the scorer never overrides keeps
vLLM's standard result exactly (same tokens, same random draws), so a
lossless request in a lossy batch stays token-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

#: vLLM's padding in the sampler's output rows.
PLACEHOLDER = -1


@dataclass
class VerifyBatch:
    """One verification step, flattened like vLLM's (T = all draft tokens).

    ``target_logits[t]`` is the target's processed distribution for draft
    token t (temperature etc. applied); ``next_logits[b]`` the one after the
    row's last draft (vLLM's bonus position). ``hidden_pre[t]`` is the
    target's final hidden state at the position that predicts draft t,
    ``hidden_post[t]`` the one at draft t itself (after reading it)."""

    draft_token_ids: torch.Tensor          # [T] int
    num_draft_tokens: list[int]            # [B]
    target_logits: torch.Tensor            # [T, V] float32
    standard_output: torch.Tensor          # [B, max_spec_len + 1] int32, -1 padded
    greedy: torch.Tensor                   # [B] bool
    lossy: torch.Tensor                    # [B] bool: rows the scorer may relax
    #: The token vLLM sampled after the row's last draft (its bonus token):
    #: right whenever every draft is accepted, as the chain is then the drafts.
    bonus_token_ids: Optional[torch.Tensor] = None  # [B]
    #: Instead of the bonus token (reflective rows, whose bonus position lies
    #: behind the probe): the distribution after the row's last real draft.
    next_logits: Optional[torch.Tensor] = None   # [B, V]
    hidden_pre: Optional[torch.Tensor] = None    # [T, H]
    hidden_post: Optional[torch.Tensor] = None   # [T, H]
    #: Reflective verification: the target's distribution for draft t after
    #: it re-read the whole draft behind the probe ([T, V]); None otherwise.
    reflective_logits: Optional[torch.Tensor] = None
    #: Reflective rows: walked from their first draft (see relaxed_chains).
    rebuild: Optional[torch.Tensor] = None  # [B] bool

    def consulted(self) -> torch.Tensor:
        """Indices of the draft tokens :func:`relaxed_chains` may ask the scorer
        about: in lossy rows, from the standard rule's first rejection on
        (every token of a rebuilt row). A scorer computes only these: the
        rest of the batch (lossless rows, tokens the standard rule kept) would
        be thrown away, and the distributions are vocabulary-wide."""
        idx: list[int] = []
        for b, (o, n) in enumerate(zip(self.offsets, self.num_draft_tokens)):
            if not n or not bool(self.lossy[b]):
                continue
            full = self.rebuild is not None and bool(self.rebuild[b])
            start = 0 if full else min(int(n), standard_count(self.standard_output[b]))
            idx.extend(range(o + start, o + int(n)))
        return torch.tensor(idx, dtype=torch.long)

    @property
    def offsets(self) -> list[int]:
        out, acc = [], 0
        for n in self.num_draft_tokens:
            out.append(acc)
            acc += int(n)
        return out


class Scorer:
    """Says which draft tokens are acceptable beyond the standard rule."""

    #: Registry name (``scorer.name`` in the config).
    name = "standard"
    #: True: never changes an output (the default, standard verification).
    lossless = True
    #: Needs ``hidden_pre`` / ``hidden_post`` in the batch.
    needs_hidden_states = False
    #: Needs ``reflective_logits`` (drafts extended with the probe and a copy).
    needs_reflection = False

    def acceptable(self, batch: VerifyBatch) -> torch.Tensor:
        """[T] bool: draft tokens this scorer accepts (the OR rule adds the
        standard rule's own acceptances)."""
        return torch.zeros(batch.draft_token_ids.shape[0], dtype=torch.bool)

    def describe(self) -> dict:
        return {"name": self.name, "lossless": self.lossless}


class StandardScorer(Scorer):
    """Standard verification (lossless): accepts nothing beyond vLLM's rule."""


@dataclass
class RelaxedResult:
    output: torch.Tensor        # [B, max_spec_len + 1] int32, -1 padded
    standard_accepted: list[int]  # accepted tokens the standard rule accepts (in the chain)
    scorer_accepted: list[int]    # tokens accepted only because of the scorer


    def accepted(self, b: int) -> int:
        """Draft tokens row ``b`` accepted."""
        return self.standard_accepted[b] + self.scorer_accepted[b] if b < len(
            self.standard_accepted) else 0

    def following_token(self, b: int) -> int:
        """The token emitted after row ``b``'s accepted drafts."""
        return int(self.output[b, standard_count(self.output[b])])


def standard_count(row: torch.Tensor) -> int:
    """Accepted drafts in one standard output row (its length minus the emitted token)."""
    return max(0, int((row != PLACEHOLDER).sum()) - 1)


def relaxed_chains(batch: VerifyBatch, acceptable: torch.Tensor,
                   generator: Optional[torch.Generator] = None,
                   rebuild: Optional[torch.Tensor] = None) -> RelaxedResult:
    """Apply the OR rule to every lossy row.

    A row is walked from its first standard rejection: a token the scorer
    accepts there is kept and the walk goes on, each later token accepted if
    the standard rule would (greedy: it is the target's argmax; sampled:
    u < p(token), drafts counted as certain, q = 1) or the scorer accepts it;
    at the first token neither accepts, the target's own token is emitted
    (argmax, or a sample of p); all accepted: the token after the last draft
    (vLLM's bonus token, or a pick from ``next_logits``).

    ``rebuild[b]`` (reflective rows, whose standard result ran over an
    extended chain): walk the row from its first draft, whatever the
    standard result says."""
    if rebuild is None:
        rebuild = batch.rebuild
    out = batch.standard_output.clone()
    B = len(batch.num_draft_tokens)
    std_acc = [0] * B
    extra = [0] * B
    offsets = batch.offsets
    acc_cpu = acceptable.to("cpu")
    drafts = batch.draft_token_ids.to("cpu")
    for b in range(B):
        n = int(batch.num_draft_tokens[b])
        full = bool(rebuild[b]) if rebuild is not None else False
        if not full:
            std_acc[b] = min(n, standard_count(out[b]))
        if n == 0 or not bool(batch.lossy[b]):
            continue
        o = offsets[b]
        start = 0 if full else std_acc[b]
        if start >= n:
            continue  # the standard rule accepted everything
        greedy = bool(batch.greedy[b])
        if not full and not bool(acc_cpu[o + start]):
            continue  # the scorer does not override: vLLM's result stands
        tokens: list[int] = []
        stopped_with: Optional[int] = None
        for j in range(n):
            d = int(drafts[o + j])
            if not full and j < start:
                tokens.append(d)
                continue
            logits = batch.target_logits[o + j]
            if greedy:
                own = int(torch.argmax(logits))
                std_ok = own == d
            else:
                p = torch.softmax(logits.float(), dim=-1)
                u = torch.rand((), generator=generator)
                std_ok = bool(u < p[d])
            if not full and j == start:
                std_ok = False  # vLLM's rule already rejected it (its own random draw)
            if std_ok:
                tokens.append(d)
                continue
            if bool(acc_cpu[o + j]):
                tokens.append(d)
                extra[b] += 1
                continue
            stopped_with = own if greedy else int(torch.multinomial(
                torch.softmax(logits.float(), dim=-1), 1, generator=generator))
            break
        if stopped_with is None:
            if batch.next_logits is not None:
                nl = batch.next_logits[b]
                stopped_with = int(torch.argmax(nl)) if greedy else int(torch.multinomial(
                    torch.softmax(nl.float(), dim=-1), 1, generator=generator))
            else:
                assert batch.bonus_token_ids is not None, "bonus_token_ids or next_logits"
                stopped_with = int(batch.bonus_token_ids.reshape(-1)[b])
        # Accepted by the standard rule = every accepted token the scorer did not need.
        std_acc[b] = len(tokens) - extra[b]
        row = tokens + [stopped_with]
        out[b].fill_(PLACEHOLDER)
        out[b, :len(row)] = torch.tensor(row, dtype=out.dtype)
    return RelaxedResult(out, std_acc, extra)
