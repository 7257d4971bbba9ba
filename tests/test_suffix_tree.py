"""SuffixTree / SuffixTreeProposer against plainly written brute-force references.

Definitions shared by the trie and the references:
* count(w): number of (overlapping) occurrences of w in the stored sequences,
  for 1 <= len(w) <= D (D = max_depth).
* time of an occurrence: global index of the append of its last token
  (sequences are appended one after another in these references).
* match(p): max L <= min(D-1, len(p)) such that p[-L:] occurs; the draft
  match additionally needs an occurrence followed by some token.
* greedy step from w: among tokens a with count(w+a) > 0 take the max
  (count(w+a), time of last occurrence of w+a); prob *= count(w+a)/den(w) where
  den(w) = count(w) minus 1 if w ends the live sequence (it has no successor
  yet). When len(w) == D, w = w[1:] first (re-anchor).
"""

from __future__ import annotations

import logging
import math
import copy
import os
import random
import threading
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from vllm_spec_plugins.proposers.suffix_tree import (
    SuffixTree,
    SuffixTreeConfig,
    SuffixTreeProposer,
    warmup,
)

warmup()

SETTINGS = settings(max_examples=int(os.environ.get("SUFFIX_TREE_EXAMPLES", "150")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------ reference
def bf_occ(seqs, D):
    cnt, last, t = Counter(), {}, 0
    for s in seqs:
        for e in range(len(s)):
            t += 1
            for k in range(1, min(D, e + 1) + 1):
                w = tuple(s[e - k + 1: e + 1])
                cnt[w] += 1
                last[w] = t
    return cnt, last


def bf_match(cnt, D, p, need_next, alphabet):
    p = list(p)
    for L in range(min(D - 1, len(p)), 0, -1):
        w = tuple(p[len(p) - L:])
        if cnt[w] > 0 and (not need_next or any(cnt[w + (a,)] > 0 for a in alphabet)):
            return L
    return 0


def bf_draft(seqs, D, ctx, max_tokens, factor, offset, pmin, live):
    cnt, last = bf_occ(seqs, D)
    alphabet = sorted({x for s in seqs for x in s})
    live_seq = tuple(seqs[-1]) if live else None
    ctx = list(ctx)

    def den(w):
        c = cnt[w]
        if live_seq is not None and len(live_seq) >= len(w) and live_seq[len(live_seq) - len(w):] == w:
            c -= 1
        return c

    def greedy(L, cap):
        w = tuple(ctx[len(ctx) - L:])
        out, prob, score = [], 1.0, 0.0
        while len(out) < cap:
            if len(w) == D:
                w = w[1:]
            cands = [a for a in alphabet if cnt[w + (a,)] > 0]
            if not cands:
                break
            a = max(cands, key=lambda a: (cnt[w + (a,)], last[w + (a,)]))
            p = prob * cnt[w + (a,)] / den(w)
            if p < pmin:
                return out, score, not out
            prob, score = p, score + p
            out.append(a)
            w = w + (a,)
        return out, score, False

    def capof(L):
        c = min(float(max_tokens), math.floor(L * factor + offset))
        return int(c) if c > 0 else 0

    L = bf_match(cnt, D, ctx, True, alphabet)
    if L == 0 or max_tokens <= 0:
        return [], 0.0, L
    out, score, by_prob = greedy(L, capof(L))
    best = (out, score, L)
    if not out and by_prob:
        Ls = L // 2
        while Ls >= 1:
            o2, s2, _ = greedy(Ls, capof(Ls))
            if o2 and s2 > best[1]:
                best = (o2, s2, Ls)
            Ls //= 2
    return best


def build(seqs, D):
    t = SuffixTree(D, node_capacity=4, token_capacity=4)  # tiny: exercise growth
    for i, s in enumerate(seqs):
        t.add_sequence(i, s)
    return t


# ----------------------------------------------------------------- strategies
@st.composite
def corpora(draw, max_seqs=4, max_len=60):
    a = draw(st.integers(2, 6))
    big = draw(st.booleans())  # large ids exercise the (parent, token) hashing
    alphabet = (draw(st.lists(st.integers(0, 2**31 - 1), min_size=a, max_size=a, unique=True))
                if big else list(range(a)))
    D = draw(st.integers(3, 8))
    seqs = draw(st.lists(st.lists(st.sampled_from(alphabet), max_size=max_len),
                         min_size=1, max_size=max_seqs))
    return alphabet, D, seqs


# ---------------------------------------------------------- (a) node counts
@SETTINGS
@given(corpora())
def test_counts_equal_bruteforce(c):
    alphabet, D, seqs = c
    t = build(seqs, D)
    t.check_invariants()
    cnt, _ = bf_occ(seqs, D)
    assert t.substring_counts() == dict(cnt)
    assert t.num_tokens == sum(map(len, seqs))
    for w in list(cnt)[:50]:
        assert t.count(w) == cnt[w]
    assert t.count([max(alphabet) + 1]) == 0


# ---------------------------------------------------------------- (b) match
@SETTINGS
@given(corpora(), st.data())
def test_match_equals_bruteforce(c, data):
    alphabet, D, seqs = c
    t = build(seqs, D)
    cnt, _ = bf_occ(seqs, D)
    for _ in range(5):
        if data.draw(st.booleans()) and any(seqs):
            s = data.draw(st.sampled_from([s for s in seqs if s]))
            i = data.draw(st.integers(0, len(s)))
            p = s[:i] + data.draw(st.lists(st.sampled_from(alphabet), max_size=3))
        else:
            p = data.draw(st.lists(st.sampled_from(alphabet), max_size=12))
        for need_next in (False, True):
            node, L = t.match(p, require_next=need_next)
            assert L == bf_match(cnt, D, p, need_next, alphabet)
            assert (L == 0) == (node == 0)


# ---------------------------------------------------------------- (c) draft
@SETTINGS
@given(corpora(), st.data())
def test_draft_equals_bruteforce(c, data):
    alphabet, D, seqs = c
    live = data.draw(st.booleans())
    t = build(seqs, D)
    for _ in range(4):
        if live:
            ctx = seqs[-1]  # a request's own trie: context == live sequence
        elif data.draw(st.booleans()) and any(seqs):
            s = data.draw(st.sampled_from([s for s in seqs if s]))
            ctx = s[: data.draw(st.integers(0, len(s)))]
        else:
            ctx = data.draw(st.lists(st.sampled_from(alphabet), max_size=12))
        k = data.draw(st.integers(0, 12))
        f = data.draw(st.sampled_from([0.5, 1.0, 2.0, 4.0]))
        o = data.draw(st.sampled_from([-1.0, 0.0, 1.5, 8.0]))
        pmin = data.draw(st.sampled_from([0.0, 0.1, 0.3, 0.5, 0.7, 1.0]))
        got = t.draft(ctx, k, f, o, pmin, live_seq_id=len(seqs) - 1 if live else None)
        want = bf_draft(seqs, D, ctx, k, f, o, pmin, live)
        assert got[0] == want[0]
        assert got[2] == want[2]
        assert got[1] == pytest.approx(want[1])
        assert len(got[0]) <= k


def test_draft_reanchors_past_max_depth():
    t = SuffixTree(4)
    t.add_sequence(0, [1, 2, 3, 4, 5, 6, 7, 8, 9] * 3)
    toks, score, L = t.draft([1, 2, 3], 10, 10.0, 0.0, 0.0)
    assert toks == [4, 5, 6, 7, 8, 9, 1, 2, 3, 4] and L == 3 and score > 0


def test_draft_falls_back_to_shorter_match():
    # Long match [.., 9, 5] is followed by 1 and 2 once each (p = 0.5); the
    # short match [5] is followed by 3 four times.
    seqs = [[9, 5, 1], [9, 5, 2], [5, 3], [5, 3], [5, 3], [5, 3]]
    t = build(seqs, 6)
    toks, score, L = t.draft([9, 5], 4, 2.0, 0.0, 0.6)
    assert toks == [3] and L == 1
    assert (toks, score, L) == tuple(bf_draft(seqs, 6, [9, 5], 4, 2.0, 0.0, 0.6, False))


# --------------------------------------------------------------- (d) remove
@SETTINGS
@given(corpora(max_seqs=5), st.data())
def test_remove_equals_rebuild(c, data):
    alphabet, D, seqs = c
    t = build(seqs, D)
    fifo = data.draw(st.booleans())  # oldest first = incremental path
    order = list(range(len(seqs))) if fifo else data.draw(st.permutations(range(len(seqs))))
    nrem = data.draw(st.integers(1, len(seqs)))
    removed = set()
    for i in order[:nrem]:
        t.remove_sequence(i)
        removed.add(i)
        rest = [s for j, s in enumerate(seqs) if j not in removed]
        t.check_invariants()
        assert t.substring_counts() == dict(bf_occ(rest, D)[0])
        assert t.num_nodes == build(rest, D).num_nodes
        assert t.num_sequences == len(rest)
    # Still a working trie afterwards.
    extra = data.draw(st.lists(st.sampled_from(alphabet), max_size=20))
    t.add_sequence("x", extra)
    t.check_invariants()
    rest = [s for j, s in enumerate(seqs) if j not in removed] + [extra]
    assert t.substring_counts() == dict(bf_occ(rest, D)[0])


def test_remove_live_sequence_neighbour_keeps_open_suffixes_valid():
    # A live sequence whose open suffixes were internal only because of the
    # removed one must drop them (they fall back to count 1).
    t = SuffixTree(5)
    t.add_sequence("old", [1, 2, 3, 1, 2])
    t.add_sequence("live", [7, 1, 2])
    t.remove_sequence("old")
    t.check_invariants()
    t.extend("live", [3, 1, 2, 3])
    t.check_invariants()
    assert t.substring_counts() == dict(bf_occ([[7, 1, 2, 3, 1, 2, 3]], 5)[0])


# -------------------------------------------------------------- (e) extend
@SETTINGS
@given(corpora(max_seqs=3), st.data())
def test_chunked_extend_equals_bulk(c, data):
    alphabet, D, seqs = c
    bulk = build(seqs, D)
    chunked = SuffixTree(D, node_capacity=4, token_capacity=4)
    for i, s in enumerate(seqs):
        chunked.add_sequence(i)
        pos = 0
        while pos < len(s):
            n = data.draw(st.integers(1, 7))
            chunked.extend(i, np.array(s[pos: pos + n], dtype=np.int64))
            pos += n
    chunked.check_invariants()
    assert chunked.substring_counts() == bulk.substring_counts()
    # Same append order => same recency tie-breaks => identical drafts.
    for _ in range(3):
        ctx = data.draw(st.lists(st.sampled_from(alphabet), max_size=10))
        assert chunked.draft(ctx, 8, 1.0, 2.0, 0.0) == bulk.draft(ctx, 8, 1.0, 2.0, 0.0)


@SETTINGS
@given(corpora(max_seqs=4), st.data())
def test_interleaved_extends_of_live_sequences(c, data):
    # Several sequences growing at once: one sequence's appends can promote
    # another's open suffix, which must then join that one's open list.
    alphabet, D, seqs = c
    t = SuffixTree(D, node_capacity=4, token_capacity=4)
    for i in range(len(seqs)):
        t.add_sequence(i)
    pos = [0] * len(seqs)
    while any(p < len(s) for p, s in zip(pos, seqs)):
        i = data.draw(st.sampled_from([i for i, s in enumerate(seqs) if pos[i] < len(s)]))
        n = data.draw(st.integers(1, 4))
        t.extend(i, seqs[i][pos[i]: pos[i] + n])
        pos[i] += n
    t.check_invariants()
    assert t.substring_counts() == dict(bf_occ(seqs, D)[0])


# ================================================================ proposer
def make(k=8, **kw):
    return SuffixTreeProposer(SuffixTreeConfig(**kw), num_speculative_tokens=k)


def run_request(p, rid, prompt, output, step=3):
    """Start a request and feed it ``output`` (drafting each step); returns
    its state, still live."""
    r = p.start_request(rid, np.asarray(prompt, np.int32))
    ctx = list(prompt)
    for i in range(0, len(output), step):
        new = output[i: i + step]
        p.on_tokens(r, np.asarray(new, np.int32))
        ctx += new
        p.propose(r, np.asarray(ctx, np.int32), 8)
    return r


def test_repetitive_context_gives_long_correct_draft():
    rng = np.random.default_rng(0)
    period = rng.integers(0, 50_000, 40).tolist()
    text = period * 5
    p = make(k=16, use_global_cache=False)
    r = p.start_request("r", np.asarray(text[:100], np.int32))
    p.on_tokens(r, np.asarray(text[100:130], np.int32))
    ctx = np.asarray(text[:130], np.int32)
    d = p.propose(r, ctx, 16)
    assert d == text[130:146]
    assert p.propose(r, ctx, 5) == text[130:135]
    assert p.propose(r, ctx, 100) == text[130:146]  # capped at k
    assert p.propose_scored(r, ctx, 16)[2] >= 16  # the match behind the draft
    p.finish_request(r)
    assert r.tree is None  # the request's trie is released
    assert p.propose(r, ctx, 16) == []  # and a finished request drafts nothing


def test_global_cache_drafts_previous_response():
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 30_000, 50).tolist()
    response = rng.integers(0, 30_000, 40).tolist()
    p = make(k=8)
    a = run_request(p, "a", prompt, response)
    p.finish_request(a)
    # A new request with the same prompt regenerates the same response: once
    # it has produced its first token, every step drafts the true next
    # tokens (the draft grows with the match: cap = match_len * factor).
    b = p.start_request("b", np.asarray(prompt, np.int32))
    assert p.propose(b, np.asarray(prompt, np.int32), 8) == []
    ctx, pos, accepted = list(prompt), 0, 0
    while pos < len(response):
        new = response[pos: pos + 1 + accepted]
        p.on_tokens(b, np.asarray(new, np.int32))
        ctx += new
        pos += len(new)
        d = p.propose(b, np.asarray(ctx, np.int32), 8)
        assert d == response[pos: pos + len(d)]
        assert len(d) == min(8, len(response) - pos, pos)
        accepted = len(d)
    ctx = np.asarray(prompt + response[:10], np.int32)
    assert p.propose(b, ctx, 8) == response[10:18]
    assert p.global_tree.num_sequences == 1
    # Without the global cache the request trie alone has nothing.
    q = make(k=8, use_global_cache=False)
    q.finish_request(run_request(q, "a", prompt, response))
    b = q.start_request("b", ctx)
    assert q.propose(b, ctx, 8) == []


def test_aborted_partial_output_is_cached_and_empty_skipped():
    p = make()
    p.finish_request(run_request(p, "a", [1, 2, 3], [4, 5, 6, 7]), aborted=True)
    p.finish_request(p.start_request("b", np.asarray([9, 9], np.int32)))  # no output: not cached
    assert [r.tolist() for r in p.cached_responses()] == [[4, 5, 6, 7]]


def test_eviction_keeps_bounds_and_memory():
    rng = np.random.default_rng(2)
    p = make(max_cached_requests=20, max_cached_tokens=1500, max_tree_depth=16)
    sizes = []
    for i in range(300):
        n = int(rng.integers(0, 200))
        out = (rng.integers(0, 40, n) if i % 2 else rng.integers(0, 10**6, n)).tolist()
        r = p.start_request(f"r{i}", np.asarray(rng.integers(0, 40, 10), np.int32))
        p.on_tokens(r, np.asarray(out, np.int32))
        p.finish_request(r)
        g = p.global_tree
        assert g.num_sequences <= 20 and g.num_tokens <= 1500
        sizes.append((g.num_nodes, g.nbytes))
    # The evicted trie is exactly the trie of what is still cached.
    fresh = SuffixTree(16)
    for i, r in enumerate(p.cached_responses()):
        fresh.add_sequence(i, r)
    g = p.global_tree
    g.check_invariants()
    assert g.num_nodes == fresh.num_nodes
    assert g.substring_counts() == fresh.substring_counts()
    assert max(s[0] for s in sizes) <= 2 * 1500  # explicit nodes <= 2/token
    assert sizes[-1][1] <= 4 * max(s[1] for s in sizes[:100])  # no unbounded growth


def test_oversized_response_not_cached():
    p = make(max_cached_tokens=5)
    p.finish_request(run_request(p, "a", [1], [1, 2, 3]))
    p.finish_request(run_request(p, "b", [1], list(range(10))))
    assert [r.tolist() for r in p.cached_responses()] == [[1, 2, 3]]


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(3)
    p = make(k=8, max_tree_depth=12)
    prompts = []
    for i in range(30):
        prompt = rng.integers(0, 20, 15).tolist()
        prompts.append(prompt)
        p.finish_request(run_request(p, f"r{i}", prompt, rng.integers(0, 20, 60).tolist()))
    path = str(tmp_path / "cache.npz")
    p.save(path)
    assert sorted(os.listdir(tmp_path)) == ["cache.npz"]  # no temp left behind
    q = make(k=8, max_tree_depth=12, cache_path=path)
    assert [a.tolist() for a in q.cached_responses()] == [a.tolist() for a in p.cached_responses()]
    for i in range(20):
        ctx = rng.integers(0, 20, 30).astype(np.int32)
        tp, tq = p.start_request("t", ctx), q.start_request("t", ctx)
        assert p.propose(tp, ctx, 8) == q.propose(tq, ctx, 8)
        assert (p.global_tree.draft(ctx, 8, 1.0, 0.0, 0.0)
                == q.global_tree.draft(ctx, 8, 1.0, 0.0, 0.0))
        p.finish_request(tp)
        q.finish_request(tq)
    # Loading under tighter bounds keeps the newest responses that fit.
    r = make(max_tree_depth=12, max_cached_requests=4)
    assert r.load(path)
    assert [a.tolist() for a in r.cached_responses()] == [a.tolist() for a in q.cached_responses()[-4:]]


@pytest.mark.parametrize("kind", ["garbage", "truncated", "version", "inconsistent", "pickle"])
def test_corrupt_cache_file_warns_and_starts_empty(tmp_path, caplog, kind):
    path = tmp_path / "cache.npz"
    good = make()
    good.finish_request(run_request(good, "a", [1, 2], [3, 4, 5]))
    good.save(str(path))
    if kind == "garbage":
        path.write_bytes(b"not a zip file at all")
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    elif kind == "version":
        np.savez(path, version=99, max_tree_depth=64, lengths=np.array([1]), tokens=np.array([1]))
    elif kind == "inconsistent":
        np.savez(path, version=1, max_tree_depth=64, lengths=np.array([5]), tokens=np.array([1]))
    else:
        np.savez(path, version=1, max_tree_depth=64, lengths=np.array([1], dtype=object),
                 tokens=np.array([1]))
    with caplog.at_level(logging.WARNING):
        p = make(cache_path=str(path))
    assert p.global_tree.num_sequences == 0
    assert any("suffix cache" in r.getMessage() for r in caplog.records)
    p.finish_request(run_request(p, "b", [1], [2, 3]))  # still usable
    assert p.global_tree.num_sequences == 1


def test_missing_cache_path_is_fine(tmp_path):
    p = make(cache_path=str(tmp_path / "nope.npz"))
    assert p.global_tree.num_sequences == 0


def test_config_validation():
    assert SuffixTreeConfig().max_tree_depth == 64
    with pytest.raises(ValidationError, match="bogus"):
        SuffixTreeConfig(bogus=1)
    for field, bad in [("max_tree_depth", 1), ("max_tree_depth", 2000),
                       ("min_token_prob", 1.5), ("min_token_prob", -0.1),
                       ("max_spec_factor", -1.0), ("max_spec_offset", float("nan")),
                       ("max_cached_requests", -1), ("max_cached_tokens", -5),
                       ("use_global_cache", "maybe")]:
        with pytest.raises(ValidationError, match=field):
            SuffixTreeConfig(**{field: bad})
    assert SuffixTreeConfig(max_spec_offset=-2.5).max_spec_offset == -2.5


def test_no_state_and_finished_state_are_harmless():
    p = make()
    ctx = np.asarray([1, 2, 3], np.int32)
    assert p.propose(None, ctx, 4) == []
    assert p.propose_scored(None, ctx, 4) == ([], 0.0, 0)
    p.on_tokens(None, ctx)
    p.finish_request(None)
    p.finish_request(None, aborted=True)
    assert p.propose_batch([(None, ctx, 4)]) == [[]]
    assert p.global_tree.num_sequences == 0
    # Finishing twice caches the response once; a finished state stays inert.
    a = run_request(p, "a", [1, 2, 3], [4, 5, 1, 2, 3, 4])
    p.finish_request(a)
    p.finish_request(a, aborted=True)
    p.on_tokens(a, ctx)
    assert p.propose(a, ctx, 4) == []
    assert [r.tolist() for r in p.cached_responses()] == [[4, 5, 1, 2, 3, 4]]


def test_states_are_independent_and_ids_can_be_reused():
    rng = random.Random(4)
    p = make()
    outputs = {}
    states = {}
    for i in range(10):
        outputs[f"r{i}"] = [rng.randrange(5) for _ in range(12)]
        states[f"r{i}"] = run_request(p, f"r{i}", [rng.randrange(5) for _ in range(8)],
                                      outputs[f"r{i}"])
    assert p.global_tree.num_sequences == 0  # nothing cached while they run
    p.finish_request(states["r3"], aborted=True)
    # vLLM resubmits aborted ids; the proposer keeps nothing by id, so even a
    # live state of the same id would not clash.
    again = run_request(p, "r3", [1, 2], [3])
    twin = p.start_request("r3", np.asarray([7, 7], np.int32))
    assert again.tree.sequence_tokens(0).tolist() == [1, 2, 3]
    assert twin.tree.sequence_tokens(0).tolist() == [7, 7]
    p.finish_request(twin)  # no output: not cached
    finished = [again] + [states[f"r{i}"] for i in range(10)]
    for r in finished:
        p.finish_request(r)  # r3's first state: already finished, not cached twice
    assert all(r.tree is None for r in finished)
    expected = [outputs["r3"], [3]] + [outputs[f"r{i}"] for i in range(10) if i != 3]
    assert [r.tolist() for r in p.cached_responses()] == expected
    assert p.global_tree.num_sequences == 11


def test_start_request_touches_nothing_shared():
    """start_request may run on a background thread while the step thread
    drafts for other requests: it builds the new state and changes nothing of
    the proposer's."""
    p = make(k=8)
    p.finish_request(run_request(p, "a", [1, 2, 3], [4, 5, 6, 7, 4, 5, 6, 7]))
    p.enable_sharing()

    def snapshot(obj):
        return {k: (v, copy.deepcopy(v)) for k, v in vars(obj).items()}

    def assert_unchanged(obj, before):
        assert vars(obj).keys() == before.keys()
        for k, (v, copied) in before.items():
            assert vars(obj)[k] is v, k  # not rebound
            if isinstance(v, np.ndarray):
                assert np.array_equal(v, copied), k
            elif k != "_global":
                assert v == copied, k

    before, before_g = snapshot(p), snapshot(p.global_tree)
    b = p.start_request("b", np.asarray([4, 5, 6] * 50, np.int32))
    assert b.tree is not p.global_tree and b.prompt_len == 150
    assert_unchanged(p, before)
    assert_unchanged(p.global_tree, before_g)


def test_start_request_on_another_thread_while_drafting():
    rng = np.random.default_rng(5)
    p = make(k=8)
    prompts = [np.tile(rng.integers(0, 50, 100), 15).astype(np.int32) for _ in range(4)]
    # Sequential reference.
    ref = make(k=8)
    ref_drafts = [ref.propose(ref.start_request("x", pr), pr, 8) for pr in prompts]
    assert all(len(d) == 8 for d in ref_drafts)
    # Same, with the tries built on a thread while this one drafts and finishes
    # a request of its own (which writes the global cache).
    built = {}
    errors = []

    def build():
        try:
            for i, pr in enumerate(prompts):
                built[i] = p.start_request(f"bg{i}", pr)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    fg = p.start_request("fg", np.asarray([1, 2, 3], np.int32))
    t = threading.Thread(target=build)
    t.start()
    ctx = [1, 2, 3]
    for tok in range(200):
        p.on_tokens(fg, np.asarray([tok % 7], np.int32))
        ctx.append(tok % 7)
        p.propose(fg, np.asarray(ctx, np.int32), 8)
    t.join()
    assert not errors
    for i, pr in enumerate(prompts):
        assert built[i].tree.sequence_tokens(0).tolist() == pr.tolist()
        built[i].tree.check_invariants()
        assert p.propose(built[i], pr, 8) == ref_drafts[i]
    p.finish_request(fg)
    assert [r.tolist() for r in p.cached_responses()] == [ctx[3:]]



def test_propose_batch_and_context_dtypes():
    p = make(k=4, use_global_cache=False)
    text = [5, 6, 7, 8] * 6
    r = p.start_request("r", np.asarray(text, np.int64))
    for ctx in (np.asarray(text, np.int32), np.asarray(text, np.int64), text):
        assert p.propose(r, ctx, 4) == [5, 6, 7, 8]
    assert p.propose_batch([(r, np.asarray(text, np.int32), 2), (None, np.zeros(1, np.int32), 2)]) == [[5, 6], []]
    assert p.propose(r, np.asarray(text, np.int32), 0) == []
