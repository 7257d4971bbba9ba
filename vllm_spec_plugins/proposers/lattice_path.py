"""Reading a drafter's token lattice: causal-consistency path search (CPS),
the n-gram model it scores with, and adaptive draft length (ADL).

A parallel (diffusion) drafter predicts every block position at once, each
without knowing which token the positions before it got; taking each
position's argmax can give paths that read badly left to right ("the the").
CPS (after DiffuSpec, arXiv 2510.02358) keeps per position the few
candidates that hold most of the mass and runs a small beam left to right,
scoring each path with the drafter's log-probabilities plus a left-to-right
n-gram model of the request's own context, so it prefers paths that continue
consistently.

ADL: the next block's length follows moving averages of how many tokens were
drafted and accepted, growing while everything drafted is accepted.

Plain Python/numpy: no vLLM, no torch.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np


class ContextNgram:
    """Counts of a request's own tokens: trigram, bigram and unigram, for a
    cheap left-to-right score. Grows with the request; dropped with it."""

    __slots__ = ("tri", "bi", "uni", "total", "last2", "vocab", "tri_n", "bi_n")

    def __init__(self, vocab: int) -> None:
        self.tri: dict = {}
        self.bi: dict = {}
        self.tri_n: dict = {}  # history -> its count (the sum of its row)
        self.bi_n: dict = {}
        self.uni: dict = {}
        self.total = 0
        self.last2: tuple = ()
        self.vocab = max(2, int(vocab))

    def add(self, tokens: Sequence[int]) -> None:
        prev = list(self.last2)
        for t in tokens:
            t = int(t)
            self.uni[t] = self.uni.get(t, 0) + 1
            self.total += 1
            if prev:
                h = prev[-1]
                d = self.bi.setdefault(h, {})
                d[t] = d.get(t, 0) + 1
                self.bi_n[h] = self.bi_n.get(h, 0) + 1
            if len(prev) >= 2:
                h = (prev[-2], prev[-1])
                d = self.tri.setdefault(h, {})
                d[t] = d.get(t, 0) + 1
                self.tri_n[h] = self.tri_n.get(h, 0) + 1
            prev = (prev + [t])[-2:]
        self.last2 = tuple(prev)

    def prob(self, a: Optional[int], b: Optional[int], t: int) -> float:
        """Interpolated P(t | a, b): weights 0.6 / 0.3 / 0.1 over the orders
        that have counts (renormalised), add-one unigram as the floor."""
        parts, weights = [], []
        if a is not None and b is not None:
            d = self.tri.get((a, b))
            if d:
                parts.append(d.get(t, 0) / self.tri_n[(a, b)])
                weights.append(0.6)
        if b is not None:
            d = self.bi.get(b)
            if d:
                parts.append(d.get(t, 0) / self.bi_n[b])
                weights.append(0.3)
        parts.append((self.uni.get(t, 0) + 1) / (self.total + self.vocab))
        weights.append(0.1)
        return sum(p * w for p, w in zip(parts, weights)) / sum(weights)


def candidate_sets(ids: np.ndarray, probs: np.ndarray, mass: float, max_candidates: int
                   ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position, the smallest best-first prefix of candidates whose mass
    reaches ``mass`` (at most ``max_candidates``, at least one)."""
    out = []
    for i in range(ids.shape[0]):
        c = np.cumsum(probs[i])
        n = int(np.searchsorted(c, mass - 1e-12)) + 1
        n = max(1, min(n, max_candidates, ids.shape[1]))
        out.append((ids[i, :n], probs[i, :n]))
    return out


def causal_consistent_path(ids: np.ndarray, probs: np.ndarray, length: int,
                           ngram: Optional[ContextNgram], *, mass: float = 0.8,
                           max_candidates: int = 15, beam: int = 3, weight: float = 0.5,
                           eos: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """The best left-to-right path of ``length`` positions through a lattice.

    ``ids``/``probs`` [K, M]: candidates per position, best first. A path's
    score is the sum over its tokens of ``weight * log q + (1 - weight) *
    log p_ngram`` (``ngram`` None: the drafter alone, i.e. the argmax path).
    The path stops after an EOS token. Returns (tokens, the drafter's
    probability of each)."""
    length = min(int(length), ids.shape[0])
    if length <= 0:
        return [], []
    sets = candidate_sets(ids, probs, mass, max_candidates)
    last2 = ngram.last2 if ngram is not None else ()
    a0 = last2[-2] if len(last2) >= 2 else None
    b0 = last2[-1] if len(last2) >= 1 else None
    # beam entries: (score, tokens, qs)
    beams: list[tuple[float, list[int], list[float]]] = [(0.0, [], [])]
    eos_set = {int(e) for e in eos}
    for i in range(length):
        cand_ids, cand_p = sets[i]
        nxt = []
        for score, toks, qs in beams:
            if toks and toks[-1] in eos_set:
                nxt.append((score, toks, qs))  # finished: carried as it is
                continue
            a = toks[-2] if len(toks) >= 2 else (b0 if toks else a0)
            b = toks[-1] if toks else b0
            for t, q in zip(cand_ids.tolist(), cand_p.tolist()):
                s = weight * math.log(max(q, 1e-12))
                if ngram is not None:
                    s += (1.0 - weight) * math.log(ngram.prob(a, b, t))
                nxt.append((score + s, toks + [t], qs + [q]))
        nxt.sort(key=lambda e: -e[0])
        beams = nxt[:max(1, beam)]
    _, toks, qs = beams[0]
    return toks, qs


def argmax_path(ids: np.ndarray, probs: np.ndarray, length: int,
                eos: Sequence[int] = ()) -> tuple[list[int], list[float]]:
    """Each position's best candidate, stopping after an EOS token."""
    toks, qs = [], []
    eos_set = {int(e) for e in eos}
    for i in range(min(int(length), ids.shape[0])):
        toks.append(int(ids[i, 0]))
        qs.append(float(probs[i, 0]))
        if toks[-1] in eos_set:
            break
    return toks, qs


class AdaptiveLength:
    """Adaptive draft length: exponential moving averages (weight ``rho`` on
    the past) of drafted and accepted tokens per step; the next length is
    the accepted average plus one, and ``grow`` more while the drafts were
    accepted in full (accepted average within half a token of the drafted
    one), between ``lo`` and ``hi``."""

    __slots__ = ("gen", "acc", "rho", "lo", "hi", "grow")

    def __init__(self, lo: int, hi: int, start: Optional[int] = None, rho: float = 0.5,
                 grow: int = 4) -> None:
        self.lo, self.hi = max(1, int(lo)), max(1, int(hi))
        s = float(self.hi if start is None else start)
        self.gen = s
        self.acc = s
        self.rho = float(rho)
        self.grow = int(grow)

    def update(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        r = self.rho
        self.gen = r * self.gen + (1 - r) * drafted
        self.acc = r * self.acc + (1 - r) * accepted

    def next(self) -> int:
        k = int(math.floor(self.acc)) + 1
        if self.acc >= self.gen - 0.5:
            k += self.grow
        return max(self.lo, min(self.hi, k))
