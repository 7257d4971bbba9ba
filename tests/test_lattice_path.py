"""Causal-consistency path search, the context n-gram model and adaptive draft
length, on small lattices checked by hand. Plain Python: no vLLM, no torch."""

import math

import numpy as np

from vllm_spec_plugins.proposers.lattice_path import (
    AdaptiveLength,
    ContextNgram,
    argmax_path,
    candidate_sets,
    causal_consistent_path,
)


def test_ngram_counts_and_interpolation():
    ng = ContextNgram(vocab=10)
    ng.add([1, 2, 3, 1, 2, 4])
    # trigram (1,2): {3: 1, 4: 1}; bigram 2: {3: 1, 4: 1}; unigram 4: 1 of 6.
    p = ng.prob(1, 2, 3)
    expect = (0.6 * 0.5 + 0.3 * 0.5 + 0.1 * (1 + 1) / (6 + 10)) / 1.0
    assert math.isclose(p, expect)
    # unseen history: unigram only (add-one)
    assert math.isclose(ng.prob(7, 8, 1), (2 + 1) / (6 + 10))
    # incremental adds keep the last two tokens as history
    ng.add([1])
    assert ng.last2 == (4, 1)
    assert ng.tri[(2, 4)] == {1: 1}


def test_candidate_sets_keep_the_smallest_set_reaching_the_mass():
    ids = np.array([[5, 6, 7, 8], [1, 2, 3, 4]])
    probs = np.array([[0.5, 0.2, 0.2, 0.1], [0.9, 0.05, 0.03, 0.02]])
    sets = candidate_sets(ids, probs, mass=0.8, max_candidates=3)
    assert sets[0][0].tolist() == [5, 6, 7]   # 0.5 + 0.2 + 0.2 >= 0.8
    assert sets[1][0].tolist() == [1]         # 0.9 alone
    assert candidate_sets(ids, probs, 0.8, 2)[0][0].tolist() == [5, 6]  # capped


def test_path_search_prefers_the_path_the_context_continues():
    """Position 0 is sure (A); position 1 is a near-tie between A (0.45) and
    B (0.40): the argmax path says "A A", but the context has "A B" twice and
    never "A A", so the n-gram score tips it to "A B"."""
    A, B, C = 11, 12, 13
    ng = ContextNgram(vocab=100)
    ng.add([A, B, C, A, B, C])
    ids = np.array([[A, B, C], [A, B, C]])
    probs = np.array([[0.9, 0.05, 0.05], [0.45, 0.40, 0.15]])
    assert argmax_path(ids, probs, 2)[0] == [A, A]
    toks, qs = causal_consistent_path(ids, probs, 2, ng, mass=0.8, beam=3, weight=0.5)
    assert toks == [A, B] and qs == [0.9, 0.40]
    # Hand check of the two scores: 0.5 log q + 0.5 log p_ngram per token.
    p_ab = ng.prob(B, C, A) , ng.prob(C, A, B)
    p_aa = ng.prob(B, C, A), ng.prob(C, A, A)
    s_ab = 0.5 * (math.log(0.9) + math.log(0.40)) + 0.5 * sum(map(math.log, p_ab))
    s_aa = 0.5 * (math.log(0.9) + math.log(0.45)) + 0.5 * sum(map(math.log, p_aa))
    assert s_ab > s_aa
    # With the drafter's score alone (weight 1) the path is the argmax one.
    assert causal_consistent_path(ids, probs, 2, ng, weight=1.0)[0] == [A, A]
    # Without a context model: the argmax path.
    assert causal_consistent_path(ids, probs, 2, None)[0] == [A, A]


def test_path_stops_after_eos_and_respects_length():
    E = 2
    ids = np.array([[5, 6], [E, 7], [8, 9], [8, 9]])
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.9, 0.1], [0.9, 0.1]])
    assert argmax_path(ids, probs, 4, eos=[E])[0] == [5, E]
    toks, _ = causal_consistent_path(ids, probs, 4, ContextNgram(50), eos=[E])
    assert toks == [5, E]
    assert causal_consistent_path(ids, probs, 1, None)[0] == [5]
    assert causal_consistent_path(ids, probs, 0, None) == ([], [])


def test_adaptive_length_grows_while_accepted_in_full_and_shrinks_after():
    adl = AdaptiveLength(lo=2, hi=16, start=4, rho=0.5, grow=4)
    # start: gen = acc = 4: all accepted -> floor(4) + 1 + 4 = 9
    assert adl.next() == 9
    adl.update(drafted=9, accepted=9)   # gen 6.5, acc 6.5
    assert adl.next() == 6 + 1 + 4
    adl.update(drafted=11, accepted=1)  # gen 8.75, acc 3.75: rejected early
    assert adl.next() == 3 + 1
    adl.update(drafted=4, accepted=0)   # gen 6.375, acc 1.875
    assert adl.next() == 2              # floor(1.875) + 1 = 2 (lo)
    for _ in range(10):
        adl.update(drafted=2, accepted=0)
    assert adl.next() == 2              # never below lo
    for _ in range(10):
        adl.update(drafted=16, accepted=16)
    assert adl.next() == 16             # never above hi
    adl.update(drafted=0, accepted=0)   # a step with no draft changes nothing
    assert adl.next() == 16
