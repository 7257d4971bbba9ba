"""Token Recycling: adjacency matrix, draft tree, chain choice, proposer (no vLLM)."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_spec_plugins.config import TokenRecyclingConfig
from vllm_spec_plugins.proposers.token_recycling import (
    CAL_BINS,
    MATRIX_FORMAT_VERSION,
    AdjacencyMatrix,
    DraftTree,
    TokenRecyclingProposer,
    best_chain,
    warmup,
)
from vllm_spec_plugins.registry import METHODS, PluginConfigError, build_proposer, resolve

warmup()

SETTINGS = settings(max_examples=int(os.environ.get("TOKEN_RECYCLING_EXAMPLES", "150")),
                    deadline=None, suppress_health_check=[HealthCheck.too_slow])


def fill(m: AdjacencyMatrix, rows: dict[int, list[tuple[int, float]]]) -> AdjacencyMatrix:
    """Set rows {token: [(candidate, prob), ...]} through the public update."""
    width = max(len(c) for c in rows.values())
    ids = np.full((len(rows), width), -1, np.int32)
    probs = np.zeros((len(rows), width), np.float32)
    for j, cands in enumerate(rows.values()):
        for r, (c, p) in enumerate(cands):
            ids[j, r], probs[j, r] = c, p
    m.update(np.array(list(rows), np.int32), ids, probs)
    return m


def proposer(k: int = 16, **cfg) -> TokenRecyclingProposer:
    return TokenRecyclingProposer(TokenRecyclingConfig(**cfg), k)


# ------------------------------------------------------------------ matrix
def test_update_overwrites_sorts_and_filters():
    m = AdjacencyMatrix(3, 100, initial_rows=8)
    fill(m, {5: [(1, 0.2), (2, 0.5), (3, 0.1), (4, 0.15)]})
    # The 3 best, best first; the rest dropped.
    assert m.row(5) == ([2, 1, 4], pytest.approx([0.5, 0.2, 0.15]))
    # A later update replaces the whole row (no stale candidates remain).
    fill(m, {5: [(7, 0.9)]})
    assert m.row(5) == ([7], pytest.approx([0.9]))
    assert m.ids[5].tolist() == [7, -1, -1]
    # Out-of-range / negative candidate ids and non-positive or NaN probs
    # are dropped; probabilities above 1 are clipped.
    fill(m, {6: [(-1, 0.5), (100, 0.4), (8, 0.0), (9, float("nan")), (10, 1.5), (11, 0.3)]})
    assert m.row(6) == ([10, 11], pytest.approx([1.0, 0.3]))
    # A repeated candidate counts once, with its best probability.
    fill(m, {7: [(3, 0.1), (4, 0.3), (3, 0.4), (4, 0.2), (5, 0.05)]})
    assert m.row(7) == ([3, 4, 5], pytest.approx([0.4, 0.3, 0.05]))
    assert m.rows_filled == 3


def test_repeated_input_keeps_later_row_and_bad_inputs_are_skipped():
    m = AdjacencyMatrix(2, 50, initial_rows=4)
    m.update(np.array([3, 9, 3, -4, 50, 1000], np.int32),
             np.array([[1, 2], [4, 5], [6, 7], [1, 1], [1, 1], [1, 1]], np.int32),
             np.array([[0.5, 0.4]] * 6, np.float32))
    assert m.row(3)[0] == [6, 7]  # the later occurrence of 3 wins
    assert m.row(9)[0] == [4, 5]
    assert m.rows_filled == 2  # -4, 50 (= max_vocab_size) and 1000 ignored
    assert m.rows_allocated <= 50
    with pytest.raises(ValueError, match="topk_ids/topk_probs"):
        m.update(np.array([1, 2]), np.zeros((1, 2), np.int32), np.zeros((1, 2), np.float32))


def test_growth_is_amortised_and_bounded_by_vocab():
    m = AdjacencyMatrix(8, 1000, initial_rows=4)
    assert m.rows_allocated == 4
    fill(m, {5: [(1, 0.5)]})
    assert m.rows_allocated == 8  # doubled (need 6)
    fill(m, {100: [(1, 0.5)]})
    assert m.rows_allocated == 101  # need beats doubling
    fill(m, {120: [(1, 0.5)]})
    assert m.rows_allocated == 202
    fill(m, {999: [(1, 0.5)], 5000: [(1, 0.5)]})
    assert m.rows_allocated == 1000  # capped at max_vocab_size; 5000 ignored
    assert m.row(5) == ([1], pytest.approx([0.5]))  # contents survive growth
    assert m.nbytes == m.max_nbytes == 1000 * (8 * 8 + 8)


def test_save_load_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    m = AdjacencyMatrix(4, 5000, initial_rows=16)
    inp = rng.integers(0, 3000, 200)
    m.update(inp, rng.integers(0, 5000, (200, 4)), rng.random((200, 4)).astype(np.float32))
    path = tmp_path / "m.npz"
    m.save(str(path))
    assert os.listdir(tmp_path) == ["m.npz"]  # the temp file was renamed
    m2 = AdjacencyMatrix(4, 5000)
    m2.load(str(path))
    assert m2.rows_filled == m.rows_filled > 0
    assert all(m2.row(t) == m.row(t) for t in range(5000))
    # A smaller vocabulary bound drops rows and candidates above it.
    m3 = AdjacencyMatrix(4, 1000)
    m3.load(str(path))
    assert m3.rows_allocated <= 1000
    assert m3.ids.max() < 1000
    assert m3.rows_filled == len({int(t) for t in inp if t < 1000
                                  and ((m.ids[t] >= 0) & (m.ids[t] < 1000)).any()})


def test_bad_files_raise_clear_errors_and_keep_contents(tmp_path):
    m = fill(AdjacencyMatrix(4, 100), {1: [(2, 0.5)]})
    good = tmp_path / "good.npz"
    m.save(str(good))

    def write(name, **arrays):
        p = tmp_path / name
        with open(p, "wb") as f:
            np.savez(f, **arrays)
        return str(p)

    ids = np.full((3, 4), -1, np.int32)
    probs = np.zeros((3, 4), np.float32)
    v = np.int64(1)  # version 1: no reliability record (still loads)
    v2 = np.int64(MATRIX_FORMAT_VERSION)
    rec = dict(row_hits=np.zeros(3), row_trials=np.ones(3), cal_hits=np.zeros(CAL_BINS),
               cal_trials=np.zeros(CAL_BINS))
    cases = {
        write("k.npz", version=v, k=np.int64(2), ids=ids[:, :2], probs=probs[:, :2]): "k=2",
        write("ver.npz", version=np.int64(99), k=np.int64(4), ids=ids, probs=probs): "version 99",
        write("miss.npz", version=v, k=np.int64(4), ids=ids): "missing",
        write("shape.npz", version=v, k=np.int64(4), ids=ids, probs=probs[:2]): "probs shape",
        write("prob.npz", version=v, k=np.int64(4), ids=ids, probs=probs + 2): "probs must be",
        write("dtype.npz", version=v, k=np.int64(4), ids=probs, probs=probs): "integer",
        write("ids.npz", version=v, k=np.int64(4), ids=ids - 5, probs=probs): "ids out of range",
        write("norec.npz", version=v2, k=np.int64(4), ids=ids, probs=probs): "row_hits",
        write("rec.npz", version=v2, k=np.int64(4), ids=ids, probs=probs,
              **{**rec, "row_hits": np.full(3, 2.0)}): "hits above trials",
        write("recshape.npz", version=v2, k=np.int64(4), ids=ids, probs=probs,
              **{**rec, "cal_trials": np.zeros(3)}): "cal_trials must be",
    }
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    cases[str(junk)] = "not a token-recycling matrix file"
    other = AdjacencyMatrix(4, 100)
    for path, needle in cases.items():
        fill(other, {7: [(8, 0.9)]})
        with pytest.raises(ValueError, match=needle):
            other.load(path)
        assert other.row(7)[0] == [8]  # unchanged after a failed load
    with pytest.raises(OSError):
        other.load(str(tmp_path / "absent.npz"))
    other.load(str(good))
    assert other.row(1)[0] == [2] and other.row(7) == ([], [])


def test_proposer_matrix_path_good_bad_and_missing(tmp_path, caplog):
    path = tmp_path / "m.npz"
    p = proposer(topk=4, tree_breadth=[2, 1])
    p.on_target_topk(None, np.array([1], np.int32), np.array([[2, 3, -1, -1]], np.int32),
                     np.array([[0.9, 0.05, 0, 0]], np.float32))
    p.save(str(path))
    q = proposer(topk=4, tree_breadth=[2, 1], matrix_path=str(path))
    assert q.propose(None, np.array([1], np.int32), 4) == [2]
    # A file of another width (or garbage) only logs a warning.
    with caplog.at_level(logging.WARNING):
        bad = proposer(topk=8, matrix_path=str(path))
    assert bad.matrix.rows_filled == 0 and "k=4" in caplog.text
    assert proposer(matrix_path=str(tmp_path / "absent.npz")).matrix.rows_filled == 0
    assert bad.load(str(tmp_path / "absent.npz")) is False


# ------------------------------------------------------------- draft tree
def hand_matrix() -> AdjacencyMatrix:
    return fill(AdjacencyMatrix(4, 100), {
        1: [(2, 0.6), (3, 0.3), (4, 0.1)],
        2: [(5, 0.5), (6, 0.4)],
        3: [(7, 0.9), (8, 0.05)],
        5: [(9, 1.0)],
        7: [(9, 0.8)],
        6: [(1, 0.5)],
    })


def test_bfs_builds_exact_tree_from_template():
    t = DraftTree.build(hand_matrix(), 1, 3, [2, 1], 100, 0.0)
    assert t.token.tolist() == [1, 2, 3, 5, 7, 9, 9]
    assert t.parent.tolist() == [-1, 0, 0, 1, 2, 3, 4]
    assert t.depth.tolist() == [0, 1, 1, 2, 2, 3, 3]
    assert t.path_prob.tolist() == pytest.approx([1, 0.6, 0.3, 0.3, 0.27, 0.3, 0.216])
    assert t.children(0) == [1, 2] and t.path(6) == [3, 7, 9]
    assert best_chain(t) == [2, 5, 9]
    # Wider template: every candidate of the root and of depth-1 nodes.
    t = DraftTree.build(hand_matrix(), 1, 2, [4], 100, 0.0)
    assert t.paths() == pytest.approx({
        (2,): 0.6, (3,): 0.3, (4,): 0.1, (2, 5): 0.3, (2, 6): 0.24,
        (3, 7): 0.27, (3, 8): 0.015})
    # The node bound cuts the deepest level first.
    t = DraftTree.build(hand_matrix(), 1, 3, [2, 1], 4, 0.0)
    assert t.token.tolist() == [1, 2, 3, 5]
    # min_path_prob prunes: 0.27 and 0.216 are below 0.28.
    t = DraftTree.build(hand_matrix(), 1, 3, [2, 1], 100, 0.28)
    assert t.token.tolist() == [1, 2, 3, 5, 9]


def test_best_chain_beats_greedy_top1():
    m = fill(AdjacencyMatrix(4, 100), {
        1: [(2, 0.5), (3, 0.45)],
        2: [(4, 0.2)],
        4: [(7, 0.5)],
        3: [(5, 0.95)],
        5: [(6, 0.9)],
    })
    t = DraftTree.build(m, 1, 3, [2, 1], 100, 0.0)
    greedy = [2, 4, 7]  # top-1 at every step: 0.5 + 0.1 + 0.05 = 0.65 expected
    assert t.paths()[tuple(greedy)] == pytest.approx(0.05)
    assert best_chain(t) == [3, 5, 6]  # 0.45 + 0.4275 + 0.385 = 1.26 expected
    p = proposer(topk=4, tree_breadth=[2, 1], min_path_prob=0.0)
    p.matrix = m
    assert p.propose(None, np.array([9, 1], np.int32), 3) == [3, 5, 6]
    assert p.propose(None, np.array([9, 1], np.int32), 1) == [2]  # depth 1: 0.5 > 0.45


def test_best_chain_skips_nodes_below_min_path_prob():
    # Hand-built tree holding a deep, low-probability branch with a big sum.
    t = DraftTree(token=[0, 1, 2, 3, 4, 5], parent=[-1, 0, 0, 2, 3, 4],
                  depth=[0, 1, 1, 2, 3, 4], path_prob=[1, 0.5, 0.4, 0.3, 0.08, 0.07],
                  min_path_prob=0.1)
    assert best_chain(t) == [2, 3]
    t.min_path_prob = 0.0
    assert best_chain(t) == [2, 3, 4, 5]
    with pytest.raises(ValueError):
        DraftTree(token=[0, 1], parent=[-1, 1], depth=[0, 1], path_prob=[1, 0.5])


def test_draft_length_adapts_to_confidence():
    def chain_matrix(prob):
        return fill(AdjacencyMatrix(2, 100), {t: [(t + 1, prob)] for t in range(60)})

    p = proposer(topk=2, tree_breadth=[1], min_path_prob=0.1)
    p.matrix = chain_matrix(0.8)
    # 0.8**10 = 0.107 >= 0.1 > 0.8**11
    assert p.propose(None, np.array([0], np.int32), 16) == list(range(1, 11))
    p.matrix = chain_matrix(0.5)
    assert p.propose(None, np.array([0], np.int32), 16) == [1, 2, 3]  # 0.125 >= 0.1 > 0.0625
    p.matrix = chain_matrix(0.99)
    assert len(p.propose(None, np.array([0], np.int32), 16)) == 16  # capped


def test_empty_matrix_unknown_root_and_caps():
    p = proposer(k=5)
    assert p.propose(None, np.array([1, 2, 3], np.int32), 5) == []
    assert p.propose(None, np.zeros(0, np.int32), 5) == []
    p.matrix = fill(AdjacencyMatrix(8, 100), {t: [(t + 1, 1.0)] for t in range(50)})
    ctx = np.array([7, 3], np.int32)
    assert p.propose(None, ctx, 0) == []
    assert p.propose(None, ctx, 2) == [4, 5]
    assert p.propose(None, ctx, 100) == [4, 5, 6, 7, 8]  # num_speculative_tokens = 5
    assert p.propose(None, np.array([99], np.int32), 5) == []  # no row for 99
    assert p.propose_batch([(None, ctx, 3), (None, np.array([40], np.int32), 9),
                            (None, ctx, 0)]) == [[4, 5, 6], [41, 42, 43, 44, 45], []]
    assert p.propose_batch([]) == []


def test_lifecycle_and_topk_hook():
    p = proposer(topk=4)
    assert p.target_topk == 4
    before = dict(vars(p))
    a = p.start_request("a", np.array([1, 2], np.int32))
    b = p.start_request("b", np.array([1, 2], np.int32))
    assert a is None and b is None  # no per-request state: the matrix is shared
    assert vars(p) == before  # and starting a request touches nothing of the proposer's
    p.on_target_topk(a, np.array([2, 5], np.int32), np.array([[5, 6, 7, 8], [9, 1, 2, 3]]),
                     np.array([[0.7, 0.1, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]], np.float32))
    p.on_tokens(a, np.array([5, 9], np.int32))
    assert p.propose(b, np.array([1, 2], np.int32), 4) == [5, 9]  # shared matrix
    p.finish_request(a)
    p.finish_request(b, aborted=True)
    assert p.matrix.rows_filled == 2  # the matrix outlives requests
    assert p.propose(None, np.array([1, 2], np.int32), 4) == [5, 9]

# ----------------------------------------------------- brute-force reference
def ref_tree(rows, root, max_depth, breadth, max_nodes, pmin):
    """Plain BFS over {token: [(cand, prob), ...] best first}."""
    nodes = [(root, -1, 0, 1.0)]
    head = 0
    while head < len(nodes):
        tok, _, d, pp = nodes[head]
        u, head = head, head + 1
        if d >= max_depth:
            break
        for c, p in rows.get(tok, [])[: breadth[min(d, len(breadth) - 1)]]:
            if pp * p <= 0 or pp * p < pmin:
                break
            if len(nodes) >= max_nodes:
                return nodes
            nodes.append((c, u, d + 1, pp * p))
    return nodes


def ref_best(nodes, pmin):
    best, best_gain, gain = [], 0.0, {0: (0.0, [])}
    for i, (tok, par, _d, pp) in enumerate(nodes[1:], 1):
        g, path = gain[par]
        gain[i] = (g + pp - pmin, path + [tok])
        if g + pp - pmin > best_gain:
            best_gain, best = g + pp - pmin, path + [tok]
    return best


@st.composite
def matrices(draw):
    vocab = draw(st.integers(2, 12))
    k = draw(st.integers(1, 4))
    n = draw(st.integers(0, 30))
    inp = draw(st.lists(st.integers(-2, vocab + 2), min_size=n, max_size=n))
    ids = draw(st.lists(st.lists(st.integers(-1, vocab + 1), min_size=k, max_size=k),
                        min_size=n, max_size=n))
    # Probabilities on a 1/8 grid: exact in float32, so ties are real ties.
    probs = draw(st.lists(st.lists(st.integers(0, 8).map(lambda x: x / 8), min_size=k,
                                   max_size=k), min_size=n, max_size=n))
    return vocab, k, inp, ids, probs


@SETTINGS
@given(matrices(), st.data())
def test_drafts_are_matrix_paths_and_match_reference(mx, data):
    vocab, k, inp, ids, probs = mx
    breadth = data.draw(st.lists(st.integers(1, k), min_size=1, max_size=3))
    max_nodes = data.draw(st.integers(2, 40))
    pmin = data.draw(st.sampled_from([0.0, 0.05, 0.2, 0.5]))
    cap = data.draw(st.integers(0, 8))
    p = TokenRecyclingProposer(TokenRecyclingConfig(
        topk=k, tree_breadth=breadth, max_tree_nodes=max_nodes, min_path_prob=pmin,
        max_vocab_size=vocab, calibrate=False), 6)
    if inp:
        p.on_target_topk(None, np.array(inp, np.int32), np.array(ids, np.int32),
                         np.array(probs, np.float32))
    # Reference matrix: later rows win, valid candidates, best first (stable).
    rows = {}
    for t, cs, ps in zip(inp, ids, probs):
        if 0 <= t < vocab:
            best = {}  # candidate -> (best prob, position of its first best)
            for i, (c, q) in enumerate(zip(cs, ps)):
                if 0 <= c < vocab and q > 0 and q > best.get(c, (0.0, 0))[0]:
                    best[c] = (q, i)
            order = sorted(best.items(), key=lambda x: (-x[1][0], x[1][1]))[:k]
            rows[t] = [(c, q) for c, (q, _) in order]
    for t in range(vocab):
        assert p.matrix.row(t) == (([c for c, _ in rows[t]], [q for _, q in rows[t]])
                                   if t in rows else ([], []))
    root = data.draw(st.integers(0, vocab))
    draft = p.propose(None, np.array([root], np.int32), cap)
    assert len(draft) <= min(cap, 6)
    prev, pp = root, 1.0
    for tok in draft:  # a path of the matrix, every prefix above min_path_prob
        cands = dict(rows[prev])
        assert tok in cands
        pp *= cands[tok]
        assert pp >= pmin and pp > 0
        prev = tok
    nodes = ref_tree(rows, root, min(cap, 6), breadth, max_nodes, pmin)
    tree = p.draft_tree(np.array([root], np.int32), cap)
    assert tree.token.tolist() == [n[0] for n in nodes]
    assert tree.parent.tolist() == [n[1] for n in nodes]
    assert tree.path_prob.tolist() == pytest.approx([n[3] for n in nodes])
    assert draft == best_chain(tree) == ref_best(nodes, pmin)


# ---------------------------------------------------------- simulated target
def test_acceptance_rises_as_the_matrix_warms():
    """A deterministic "target" over 200 tokens: a fixed top-4 list per
    previous token, top-1 prob 0.9 (greedy = top-1), except that in some
    25-token stretches a token's first two candidates swap (a context
    effect), so a recycled row is not always right."""
    rng = np.random.default_rng(1)
    V, K, k = 200, 4, 8
    cands = np.stack([rng.permutation(V) for _ in range(K)], axis=1).astype(np.int32)
    cand_probs = np.array([0.9, 0.05, 0.03, 0.02], np.float32)

    def target(pos, prev):
        """(greedy next token, top-K row) after ``prev`` at position ``pos``."""
        ids = cands[prev].copy()
        if ((pos // 25) * 7919 + prev * 31) % 5 == 0:
            ids[[0, 1]] = ids[[1, 0]]
        return int(ids[0]), ids

    p = proposer(k=k, topk=K, tree_breadth=[2, 1])
    r = p.start_request("r", np.array([0, 1], np.int32))
    ctx = [0, 1]
    accepted = []
    for _ in range(600):
        draft = p.propose(r, np.array(ctx, np.int32), k)
        inputs = [ctx[-1]] + draft
        rows_ids, n_acc = [], 0
        for j, tok in enumerate(inputs):  # verify: greedy target, chain prefix
            nxt, ids = target(len(ctx) + j, tok)
            rows_ids.append(ids)
            if j < len(draft) and n_acc == j and draft[j] == nxt:
                n_acc += 1
        bonus, _ = target(len(ctx) + n_acc, inputs[n_acc])
        p.on_target_topk(r, np.array(inputs, np.int32), np.array(rows_ids),
                         np.tile(cand_probs, (len(inputs), 1)))
        new = draft[:n_acc] + [bonus]
        p.on_tokens(r, np.array(new, np.int32))
        ctx += new
        accepted.append(n_acc)
    first, last = np.mean(accepted[:50]), np.mean(accepted[-200:])
    print(f"\nmean accepted tokens/step: first 50 steps {first:.2f}, last 200 {last:.2f}")
    assert first < 0.5
    assert 2.5 < last < k  # warm, but the context effect still costs tokens
    p.finish_request(r)


# ------------------------------------------------------------- calibration
def test_overwrite_scores_the_old_row_against_the_new_argmax():
    def b(p):  # the bin of a stored probability (probabilities away from bin edges)
        return int(p * CAL_BINS)

    m = fill(AdjacencyMatrix(4, 100), {5: [(1, 0.93), (2, 0.07)]})
    assert m.cal_trials.sum() == 0 and m.row_trials[5] == 0  # a first fill scores nothing
    fill(m, {5: [(2, 0.83), (3, 0.13)]})  # new argmax 2: old top-1 (1) missed, old #2 hit
    assert m.row_trials[5] == 1 and m.row_hits[5] == 0
    assert m.cal_trials[b(0.93)] == 1 and m.cal_hits[b(0.93)] == 0
    assert m.cal_trials[b(0.07)] == 1 and m.cal_hits[b(0.07)] == 1
    fill(m, {5: [(2, 0.73)]})  # old top-1 (2) is the new argmax: a hit, older record decays
    assert m.row_hits[5] == pytest.approx(1.0) and m.row_trials[5] == pytest.approx(1.8)
    rates = m.calibration_rates()
    assert 0.5 < rates[b(0.93)] < 0.925  # one miss pulls the bin below its centre
    assert rates[b(0.53)] == -1.0  # no evidence: raw probability used
    rel = m.reliability()
    assert rel["observations"] == 4 and rel["top1_hit_rate"] == pytest.approx(1 / 1.8, abs=1e-3)
    # The row's own record (1 hit of 1.8) pulls its top-1 estimate toward it.
    tree = DraftTree.build(m, 5, 1, [1], 8, 0.0)
    assert rates[b(0.73)] == -1.0  # so the curve gives the stored 0.73 for its bin
    assert tree.path_prob[1] == pytest.approx((1.0 + 2.0 * 0.73) / (1.8 + 2.0), rel=1e-5)
    raw = DraftTree.build(m, 5, 1, [1], 8, 0.0, calibrate=False)
    assert raw.path_prob[1] == pytest.approx(0.73)


def test_draft_threshold_rises_with_the_step_batch():
    p = proposer(topk=2, tree_breadth=[1], min_path_prob=0.1, batch_cost_slope=0.25)
    assert p.draft_threshold(1) == pytest.approx(0.1)
    assert p.draft_threshold(5) == pytest.approx(0.2)
    assert p.draft_threshold(10_000) == 0.95
    p.matrix = fill(AdjacencyMatrix(2, 100), {t: [(t + 1, 0.8)] for t in range(60)})
    ctx = np.array([0], np.int32)
    assert len(p.propose(None, ctx, 16)) == 10  # 0.8**10 >= 0.1
    one_row_step = p.propose_batch([(None, ctx, 16)], step_rows=5)[0]
    assert one_row_step == list(range(1, 8))  # 0.8**7 = 0.21 >= 0.2 > 0.8**8
    assert p.propose_batch([(None, ctx, 16)] * 5) == [one_row_step] * 5
    flat = proposer(topk=2, tree_breadth=[1], min_path_prob=0.1, batch_cost_slope=0.0)
    flat.matrix = p.matrix
    assert len(flat.propose_batch([(None, ctx, 16)] * 5)[0]) == 10


def simulate(p: TokenRecyclingProposer, steps: int, seed: int, k: int = 8):
    """Greedy decoding of a synthetic "target" whose stored probabilities are
    overconfident: it always reports its top-1 at 0.9, but after half of the
    tokens the next token depends on a hidden context redrawn every step (so
    a recycled row is right about 1 time in 4); after the other half it is
    fixed. Returns (drafted, accepted) totals after a warm-up."""
    rng = np.random.default_rng(seed)
    V, K = 120, 4
    fixed = rng.permutation(V)
    by_ctx = np.stack([rng.permutation(V) for _ in range(4)])
    ambiguous = rng.random(V) < 0.5
    probs = np.array([0.9, 0.05, 0.03, 0.02], np.float32)

    def row(prev, hidden):
        first = by_ctx[hidden, prev] if ambiguous[prev] else fixed[prev]
        rest = [(first + d) % V for d in (1, 2, 3)]
        return [int(first)] + [int(x) for x in rest]

    ctx = [0]
    drafted = accepted = 0
    for step in range(steps):
        hidden = int(rng.integers(4))
        draft = p.propose(None, np.array(ctx, np.int32), k)
        inputs = [ctx[-1]] + draft
        rows = [row(t, hidden) for t in inputs]
        n_acc = 0
        while n_acc < len(draft) and draft[n_acc] == rows[n_acc][0]:
            n_acc += 1
        p.on_target_topk(None, np.array(inputs, np.int32), np.array(rows, np.int32),
                         np.tile(probs, (len(inputs), 1)))
        ctx += draft[:n_acc] + [rows[n_acc][0]]
        if step >= steps // 4:
            drafted += len(draft)
            accepted += n_acc
    return drafted, accepted


def test_calibration_drafts_less_and_wastes_less_on_an_overconfident_target():
    cfg = dict(topk=4, tree_breadth=[1], min_path_prob=0.1)
    raw_d, raw_a = simulate(proposer(**cfg, calibrate=False), 1500, seed=7)
    cal_d, cal_a = simulate(proposer(**cfg), 1500, seed=7)
    print(f"\nraw: drafted {raw_d}, accepted {raw_a} ({raw_a / raw_d:.0%}); "
          f"calibrated: drafted {cal_d}, accepted {cal_a} ({cal_a / cal_d:.0%})")
    # Raw probabilities (0.9 per edge) always draft to the cap; the calibrated
    # ones stop where rows are unreliable, so far fewer tokens are wasted...
    assert cal_d < 0.7 * raw_d
    assert cal_a / cal_d > 1.3 * raw_a / raw_d
    # ...at a small price in accepted tokens, and a better net value at the
    # default price of one drafted token (min_path_prob = 0.1).
    assert cal_a > 0.8 * raw_a
    assert cal_a - 0.1 * cal_d > raw_a - 0.1 * raw_d


def test_reliability_record_survives_save_load_and_v1_files_load(tmp_path):
    p = proposer(topk=4, tree_breadth=[1], max_vocab_size=1024)
    simulate(p, 200, seed=3)
    m = p.matrix
    assert m.cal_trials.sum() > 0 and m.row_trials.sum() > 0
    path = tmp_path / "m.npz"
    m.save(str(path))
    m2 = AdjacencyMatrix(4, 1024)
    m2.load(str(path))
    n = m.rows_allocated
    assert np.array_equal(m2.cal_hits, m.cal_hits) and np.array_equal(m2.cal_trials, m.cal_trials)
    filled = m.ids[:, 0] >= 0
    assert np.array_equal(m2.row_hits[:n][filled], m.row_hits[filled])
    assert np.array_equal(m2.row_trials[:n][filled], m.row_trials[filled])
    ctx = np.array([0, 5], np.int32)
    q = proposer(topk=4, tree_breadth=[1])
    q.matrix = m2
    assert q.propose(None, ctx, 8) == p.propose(None, ctx, 8)
    # A version-1 file (before the record existed) loads with an empty record.
    v1 = tmp_path / "v1.npz"
    with open(v1, "wb") as f:
        np.savez(f, version=np.int64(1), k=np.int64(4), ids=m.ids, probs=m.probs)
    m3 = AdjacencyMatrix(4, 1000)
    m3.load(str(v1))
    assert m3.rows_filled == m.rows_filled and m3.cal_trials.sum() == 0
    assert m3.row_trials.sum() == 0
    assert p.stats["observations"] > 0 and p.stats["rows_filled"] == m.rows_filled


# --------------------------------------------------------- config/registry
def test_registry_resolves_and_builds():
    method, entry, cfg = resolve({"method": "token_recycling", "topk": 4,
                                  "tree_breadth": [4, 1]})
    assert entry.lossless and isinstance(cfg, TokenRecyclingConfig)
    assert METHODS["token_recycling"].summary
    _, prop, _ = build_proposer({"method": "token_recycling", "topk": 4}, 16)
    assert isinstance(prop, TokenRecyclingProposer) and prop.target_topk == 4


@pytest.mark.parametrize("settings, needle", [
    ({"topk": 0}, "spec_plugins.topk"),
    ({"topk": 33}, "spec_plugins.topk"),
    ({"tree_breadth": []}, "spec_plugins.tree_breadth"),
    ({"topk": 4, "tree_breadth": [8, 1]}, "spec_plugins.tree_breadth"),
    ({"tree_breadth": [2, 0]}, "spec_plugins.tree_breadth"),
    ({"max_tree_nodes": 1}, "spec_plugins.max_tree_nodes"),
    ({"min_path_prob": 1.5}, "spec_plugins.min_path_prob"),
    ({"batch_cost_slope": -1}, "spec_plugins.batch_cost_slope"),
    ({"calibrate": "sometimes"}, "spec_plugins.calibrate"),
    ({"max_vocab_size": 0}, "spec_plugins.max_vocab_size"),
    ({"matrix_pth": "x"}, "spec_plugins.matrix_pth: unknown setting"),
])
def test_bad_settings_name_the_field(settings, needle):
    with pytest.raises(PluginConfigError) as err:
        resolve({"method": "token_recycling", **settings})
    assert needle in str(err.value)


# ------------------------------------------------------------------ timing
def test_propose_batch_timing_printed():
    rng = np.random.default_rng(0)
    V = 49152
    ids = rng.integers(0, V, (V, 8)).astype(np.int32)
    # Confident rows (top-1 0.9): mostly a single chain of 16 tokens.
    confident = np.tile(np.array([0.9, 0.03, 0.02, 0.02, 0.01, 0.01, 0.005, 0.005],
                                 np.float32), (V, 1))
    batch = [(None, rng.integers(0, V, 100).astype(np.int32), 16) for i in range(32)]
    for name, probs, pmin in [("confident rows", confident, 0.1),
                              ("worst case: full 125-node tree", np.full((V, 8), 0.9,
                                                                         np.float32), 0.0)]:
        # batch_cost_slope 0: the full-length drafts are what is timed here
        p = proposer(k=16, min_path_prob=pmin, batch_cost_slope=0.0)
        p.on_target_topk(None, np.arange(V, dtype=np.int32), ids, probs)
        assert len(p.draft_tree(batch[0][1], 16)) == (17 if pmin else 125)
        assert all(len(d) == 16 for d in p.propose_batch(batch))
        reps = 200
        t0 = time.perf_counter()
        for _ in range(reps):
            p.propose_batch(batch)
        dt = (time.perf_counter() - t0) / reps
        t0 = time.perf_counter()
        for _ in range(reps):
            p.on_target_topk(None, batch[0][1][:17], ids[:17], probs[:17])
        du = (time.perf_counter() - t0) / reps
        print(f"\n{name}: propose_batch(32 rows, k=8, 16 tokens) {dt * 1e3:.3f} ms/step = "
              f"{dt / 32 * 1e6:.1f} us/row; on_target_topk(17 rows) {du * 1e6:.1f} us; "
              f"matrix {p.matrix.nbytes / 2**20:.2f} MiB")
