"""SuffixRecyclingProposer: the switch between suffix tree and Token Recycling."""

from __future__ import annotations

import logging
import os

import numpy as np
import pytest
from pydantic import ValidationError

from vllm_spec_plugins.config import SuffixRecyclingConfig
from vllm_spec_plugins.proposers.suffix_recycling import (
    HybridState,
    SuffixRecyclingProposer,
    state_paths,
)
from vllm_spec_plugins.proposers.suffix_tree import SuffixTreeProposer
from vllm_spec_plugins.proposers.token_recycling import TokenRecyclingProposer
from vllm_spec_plugins.registry import PluginConfigError, build_proposer, resolve

A = list(range(100, 120))  # a 20-token span the request will repeat
B = list(range(200, 230))


def hybrid(k: int = 16, **cfg) -> SuffixRecyclingProposer:
    cfg.setdefault("suffix_tree", {"use_global_cache": False})
    return SuffixRecyclingProposer(SuffixRecyclingConfig(**cfg), k)


def teach(p, rows: dict[int, list[int]], prob: float = 0.9) -> None:
    """Feed target top-k rows {token: [next candidates]} through the hook."""
    for t, cands in rows.items():
        ids = np.full((1, p.target_topk), -1, np.int32)
        probs = np.zeros((1, p.target_topk), np.float32)
        ids[0, :len(cands)] = cands
        probs[0, :len(cands)] = prob
        p.on_target_topk(None, np.array([t], np.int32), ids, probs)


def test_propose_scored_matches_propose_and_reports_match_len():
    s = SuffixTreeProposer(SuffixRecyclingConfig().suffix_tree, 16)
    prompt = np.array(A + B + A[:6], np.int32)
    r = s.start_request("r", prompt)
    toks, score, L = s.propose_scored(r, prompt, 16)
    assert toks == s.propose(r, prompt, 16) == A[6:12]  # cap = match_len * 1.0
    assert L == 6 and score == pytest.approx(6.0)
    assert s.propose_scored(None, prompt, 16) == ([], 0.0, 0)
    assert s.propose_scored(r, prompt, 0) == ([], 0.0, 0)


def test_switching_rule():
    p = hybrid(min_suffix_match=4)
    # Recycling knows a different continuation for every token of A, so the
    # source of a draft is visible.
    teach(p, {t: [t + 1000] for t in A + B} | {t + 1000: [t + 1001] for t in A + B})
    prompt = np.array(A + B + A[:8], np.int32)
    r = p.start_request("r", prompt)
    # Long repeated match (8 >= 4): the suffix tree's copy of A.
    assert p.propose(r, prompt, 16) == A[8:16]
    assert p.choice_counts["suffix_tree"] == 1
    # A token never seen in the context: no match, Token Recycling.
    p.on_tokens(r, np.array([B[0] + 1000], np.int32))
    ctx = np.concatenate([prompt, [B[0] + 1000]]).astype(np.int32)
    assert p.propose(r, ctx, 3) == [B[0] + 1001, B[0] + 1002, B[0] + 1003]
    assert p.choice_counts["token_recycling"] == 1
    # A short match (2 tokens: B[3], B[4]) below the threshold: recycling,
    # although the suffix tree drafts something.
    ctx2 = np.array(A + B + [7, B[3]], np.int32)
    s = p.start_request("s", ctx2)
    toks, _, L = p.suffix.propose_scored(s.suffix, ctx2, 16)
    assert toks and L < 4
    assert p.propose(s, ctx2, 2) == [B[3] + 1000, B[3] + 1001]
    assert p.choice_counts["token_recycling"] == 2
    # Same short match but recycling has no row: the suffix draft is used.
    q = hybrid(min_suffix_match=4)
    s = q.start_request("s", ctx2)
    assert q.propose(s, ctx2, 16) == toks
    assert q.choice_counts == {"suffix_tree": 0, "token_recycling": 0,
                               "suffix_tree_fallback": 1, "none": 0}
    # Neither side has anything.
    assert q.propose(s, np.array([5000], np.int32), 16) == []
    assert q.choice_counts["none"] == 1
    # A lower threshold turns the short match into a suffix-tree draft.
    r = hybrid(min_suffix_match=1)
    teach(r, {B[3]: [B[3] + 1000]})
    s = r.start_request("s", ctx2)
    assert r.propose(s, ctx2, 16) == toks
    assert r.choice_counts["suffix_tree"] == 1
    # The snapshot diagnostics carry both the choices and the matrix's record.
    assert r.stats["suffix_tree"] == 1 and r.stats["matrix"]["rows_filled"] > 0


def test_batch_mixes_sources_in_row_order():
    p = hybrid()
    teach(p, {5000: [5001], 5001: [5002]})
    prompt = np.array(A + B + A[:8], np.int32)
    a = p.start_request("a", prompt)
    b = p.start_request("b", np.array([1, 2, 5000], np.int32))
    out = p.propose_batch([(b, np.array([1, 2, 5000], np.int32), 4),
                           (a, prompt, 4), (b, np.array([1, 2, 5000], np.int32), 0)])
    assert out == [[5001, 5002], A[8:12], []]
    # No state: recycling still drafts from the shared matrix, the suffix side nothing.
    assert p.propose_batch([(None, np.array([5000], np.int32), 4),
                            (None, prompt, 4)]) == [[5001, 5002], []]


def test_lifecycle_forwarded_to_both():
    p = hybrid(suffix_tree={"use_global_cache": True})
    assert p.target_topk == 8
    a = p.start_request("a", np.array(A, np.int32))
    b = p.start_request("b", np.array(B, np.int32))
    assert isinstance(a, HybridState) and a.recycling is None
    assert a.suffix.tree.sequence_tokens(0).tolist() == A
    assert b.suffix.tree.sequence_tokens(0).tolist() == B
    p.on_tokens(a, np.array([1, 2], np.int32))
    assert a.suffix.tree.sequence_length(0) == len(A) + 2
    assert b.suffix.tree.sequence_length(0) == len(B)
    p.on_target_topk(a, np.array([2], np.int32), np.arange(8)[None], np.full((1, 8), 0.1))
    assert p.recycling.matrix.rows_filled == 1
    p.finish_request(a)
    p.finish_request(b, aborted=True)
    assert a.suffix.tree is None and b.suffix.tree is None  # both released
    assert [r.tolist() for r in p.suffix.cached_responses()] == [[1, 2]]  # b had no output
    p.finish_request(a)  # twice: nothing cached twice
    p.finish_request(None)
    assert p.suffix.global_tree.num_sequences == 1


def test_finish_reaches_recycling_even_if_suffix_fails():
    p = hybrid()
    calls = []

    def failing_finish(state, aborted=False):
        raise RuntimeError("suffix half failed")

    p.suffix.finish_request = failing_finish
    p.recycling.finish_request = lambda state, aborted=False: calls.append((state, aborted))
    st = p.start_request("a", np.array(A, np.int32))
    with pytest.raises(RuntimeError, match="suffix half failed"):
        p.finish_request(st, aborted=True)
    assert calls == [(None, True)]


def test_state_paths_and_same_file_refused():
    from vllm_spec_plugins.integration.state_files import state_paths

    assert list(state_paths(hybrid().config)) == []
    p = hybrid(suffix_tree={"cache_path": "/d/s.npz"}, token_recycling={"matrix_path": "/d/m.npz"})
    assert list(state_paths(p.config)) == [("suffix_tree.cache_path", "/d/s.npz"),
                                           ("token_recycling.matrix_path", "/d/m.npz")]
    # One file for both: the matrix would overwrite the suffix cache on every save.
    home = os.path.expanduser("~")
    for cache, matrix in [("/d/x.npz", "/d/x.npz"),
                          ("x.npz", os.path.join(os.getcwd(), "x.npz")),
                          ("~/x.npz", os.path.join(home, ".", "x.npz")),
                          ("/d/../d/x.npz", "/d/x.npz")]:
        with pytest.raises(ValidationError) as err:
            SuffixRecyclingConfig(suffix_tree={"cache_path": cache},
                                  token_recycling={"matrix_path": matrix})
        msg = str(err.value)
        assert "suffix_tree.cache_path" in msg and "token_recycling.matrix_path" in msg
        assert "overwrite the suffix cache on every save" in msg
    with pytest.raises(PluginConfigError) as err:
        resolve({"method": "suffix_recycling", "suffix_tree": {"cache_path": "/d/x.npz"},
                 "token_recycling": {"matrix_path": "/d/x.npz"}})
    assert "spec_plugins.token_recycling" in str(err.value)
    assert "overwrite the suffix cache" in str(err.value)
    # Different files (or only one set) are fine.
    SuffixRecyclingConfig(suffix_tree={"cache_path": "/d/x.npz"},
                          token_recycling={"matrix_path": "/d/y.npz"})
    SuffixRecyclingConfig(suffix_tree={"cache_path": "/d/x.npz"})


def test_save_load_both_halves(tmp_path, caplog):
    p = hybrid(suffix_tree={"use_global_cache": True})
    a = p.start_request("a", np.array([1, 2, 3], np.int32))
    p.on_tokens(a, np.array(A, np.int32))
    p.finish_request(a)  # A goes to the global cache
    teach(p, {7: [8, 9]})
    path = str(tmp_path / "state.npz")
    p.save(path)
    suffix_path, recycling_path = state_paths(path)
    assert (suffix_path, recycling_path) == (str(tmp_path / "state.suffix.npz"),
                                             str(tmp_path / "state.recycling.npz"))
    assert sorted(os.listdir(tmp_path)) == ["state.recycling.npz", "state.suffix.npz"]
    q = hybrid(suffix_tree={"use_global_cache": True})
    assert q.load(path) is True
    assert [r.tolist() for r in q.suffix.cached_responses()] == [A]
    assert q.recycling.matrix.row(7)[0] == [8, 9]
    # The sub-configs' own paths load at construction too.
    r = hybrid(suffix_tree={"use_global_cache": True, "cache_path": suffix_path},
               token_recycling={"matrix_path": recycling_path})
    assert r.suffix.cached_responses()[0].tolist() == A and r.recycling.matrix.rows_filled == 1
    with caplog.at_level(logging.WARNING):
        assert hybrid().load(str(tmp_path / "absent")) is False
    assert "absent.suffix.npz" in caplog.text and "absent.recycling.npz" in caplog.text


def test_registry_and_config_errors_name_nested_fields():
    method, entry, cfg = resolve({"method": "suffix_recycling"})
    assert entry.lossless and cfg.min_suffix_match == 4
    assert cfg.suffix_tree.max_tree_depth == 64 and cfg.token_recycling.topk == 8
    _, prop, _ = build_proposer({"method": "suffix_recycling",
                                 "token_recycling": {"topk": 4, "tree_breadth": [2, 1]}}, 16)
    assert isinstance(prop, SuffixRecyclingProposer) and prop.target_topk == 4
    assert isinstance(prop.recycling, TokenRecyclingProposer)
    for settings, needle in [
        ({"token_recycling": {"topk": 0}}, "spec_plugins.token_recycling.topk"),
        ({"suffix_tree": {"bogus": 1}}, "spec_plugins.suffix_tree.bogus: unknown setting"),
        ({"min_suffix_match": 0}, "spec_plugins.min_suffix_match"),
        ({"suffix_tree": {"max_tree_depth": 8}, "min_suffix_match": 8},
         "spec_plugins.min_suffix_match"),
        ({"min_token_prob": 0.2}, "spec_plugins.min_token_prob: unknown setting"),
    ]:
        with pytest.raises(PluginConfigError) as err:
            resolve({"method": "suffix_recycling", **settings})
        assert needle in str(err.value)
