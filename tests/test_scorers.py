"""Scorer units against hand-built logits: the OR rule, thresholds, fusion,
head files, settings. Plain torch (no vLLM engine)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from vllm_spec_plugins.engine_config import (
    PluginConfigError,
    SCORER_KEY,
    request_lossy,
    scorer_config,
)
from vllm_spec_plugins.scorers.base import StandardScorer, VerifyBatch, relaxed_chains
from vllm_spec_plugins.scorers.judge import (
    JudgeFormatError,
    JudgeHead,
    JudgeScorer,
    JudgeTarget,
    LOGIT_FEATURES,
    judge_features,
    load_head,
    logit_features,
    read_head_spec,
    resolve_head_path,
    save_head,
)
from vllm_spec_plugins.scorers.reflective import (
    ReflectiveScorer,
    extend_draft,
    max_real_draft,
)

V = 10


def peaked(token: int, p: float = 0.9, second: int | None = None, p2: float = 0.0) -> torch.Tensor:
    """Logits whose softmax puts ``p`` on ``token`` (and ``p2`` on ``second``)."""
    probs = torch.full((V,), (1.0 - p - p2) / (V - 1 - (second is not None)))
    probs[token] = p
    if second is not None:
        probs[second] = p2
    return probs.log()


def batch_of(rows: list[tuple[list[int], list[int]]], standard: list[list[int]],
             lossy: list[bool], greedy: list[bool] | None = None,
             bonus: list[int] | None = None) -> VerifyBatch:
    """rows: (drafts, target argmax per draft position)."""
    drafts = torch.tensor([d for ds, _ in rows for d in ds], dtype=torch.int64)
    logits = torch.stack([peaked(t) for _, ts in rows for t in ts]) if len(drafts) else \
        torch.zeros((0, V))
    width = max(len(ds) for ds, _ in rows) + 1
    out = torch.full((len(rows), width), -1, dtype=torch.int32)
    for b, st in enumerate(standard):
        out[b, :len(st)] = torch.tensor(st, dtype=torch.int32)
    return VerifyBatch(drafts, [len(ds) for ds, _ in rows], logits, out,
                       torch.tensor(greedy or [True] * len(rows)), torch.tensor(lossy),
                       bonus_token_ids=torch.tensor(bonus or [9] * len(rows)))


def row(out: torch.Tensor, b: int) -> list[int]:
    return [int(x) for x in out[b] if int(x) != -1]


# ----------------------------------------------------------------------------- OR rule
def test_or_rule_accepts_what_the_scorer_accepts_then_goes_on_with_the_standard_rule():
    # drafts 5 6 7 3; the target's own tokens 5 8 7 4: standard accepts 5, emits 8.
    b = batch_of([([5, 6, 7, 3], [5, 8, 7, 4])], [[5, 8]], [True])
    ok = torch.tensor([False, True, False, False])
    res = relaxed_chains(b, ok)
    # 6 by the scorer, 7 by the standard rule (argmax 7), 3 rejected: the target's 4.
    assert row(res.output, 0) == [5, 6, 7, 4]
    assert res.scorer_accepted == [1] and res.standard_accepted == [2]
    assert res.accepted(0) == 3 and res.following_token(0) == 4


def test_scorer_silent_at_the_first_rejection_keeps_vllms_row():
    b = batch_of([([5, 6, 7], [5, 8, 7])], [[5, 8]], [True])
    res = relaxed_chains(b, torch.tensor([False, False, True]))  # later acceptances don't matter
    assert row(res.output, 0) == [5, 8]
    assert res.scorer_accepted == [0] and res.standard_accepted == [1]


def test_all_drafts_accepted_ends_with_the_bonus_token():
    b = batch_of([([5, 6], [1, 2])], [[1]], [True], bonus=[4])
    res = relaxed_chains(b, torch.tensor([True, True]))
    assert row(res.output, 0) == [5, 6, 4]
    assert res.scorer_accepted == [2] and res.standard_accepted == [0]


def test_lossless_rows_are_untouched_in_a_mixed_batch():
    rows = [([5, 6], [5, 8]), ([5, 6], [5, 8])]
    b = batch_of(rows, [[5, 8], [5, 8]], [False, True])
    res = relaxed_chains(b, torch.tensor([False, True, False, True]))
    assert row(res.output, 0) == [5, 8]          # opted out: vLLM's result
    assert row(res.output, 1) == [5, 6, 9]       # lossy: the scorer's 6, then the bonus


def test_standard_scorer_changes_nothing():
    b = batch_of([([5, 6, 7], [5, 8, 7])], [[5, 8]], [True])
    res = relaxed_chains(b, StandardScorer().acceptable(b))
    assert torch.equal(res.output, b.standard_output)


def test_rebuilt_rows_walk_from_the_first_draft_and_end_with_next_logits():
    b = batch_of([([5, 6], [5, 6])], [[5, 6]], [True])
    b.standard_output = torch.tensor([[5, 6, 1, 2, 3]], dtype=torch.int32)  # over d+probe+d
    b.next_logits = torch.stack([peaked(2)])
    res = relaxed_chains(b, torch.tensor([False, False]), rebuild=torch.tensor([True]))
    assert row(res.output, 0) == [5, 6, 2]
    assert res.standard_accepted == [2]


def test_sampled_rows_use_the_target_distribution():
    # a draft the target gives probability ~1 is accepted by the standard rule
    b = batch_of([([5, 6, 7], [5, 8, 7])], [[5, 8]], [True], greedy=[False])
    b.target_logits = torch.stack([peaked(5, 0.999999), peaked(8, 0.999999), peaked(7, 0.999999)])
    g = torch.Generator().manual_seed(0)
    res = relaxed_chains(b, torch.tensor([False, True, False]), g)
    assert row(res.output, 0)[:3] == [5, 6, 7]
    assert len(row(res.output, 0)) == 4


# ----------------------------------------------------------------------------- judge
def _target(h: int = 3) -> JudgeTarget:
    return JudgeTarget("toy", "ToyForCausalLM", h, V, 2)


def _head_on_gap(threshold: float, h: int = 3) -> JudgeHead:
    """A head whose logit is 2 - gap (gap = log p(top) - log p(draft))."""
    n = 2 * h + len(LOGIT_FEATURES)
    w = torch.zeros(n)
    w[2 * h + 2] = -1.0
    return JudgeHead(w, 2.0, torch.zeros(n), torch.ones(n), threshold, _target(h))


def test_logit_features_are_log_probs_gap_and_entropy():
    logits = torch.stack([peaked(1, 0.5, 2, 0.25)])
    f = logit_features(logits, torch.tensor([2]))[0]
    assert f[0].item() == pytest.approx(math.log(0.25), abs=1e-5)
    assert f[1].item() == pytest.approx(math.log(0.5), abs=1e-5)
    assert f[2].item() == pytest.approx(math.log(2.0), abs=1e-5)
    assert f[3].item() > 0


def test_judge_accepts_at_its_threshold():
    h = 3
    rows = [([5, 6], [5, 8])]
    b = batch_of(rows, [[5, 8]], [True])
    # draft 6 at position 1: target gives it p small -> big gap; position 0: gap 0
    b.target_logits = torch.stack([peaked(5), peaked(8, 0.5, 6, 0.4)])
    b.hidden_pre = torch.zeros(2, h)
    b.hidden_post = torch.zeros(2, h)
    b.rebuild = torch.tensor([True])  # a row walked from its first draft: both consulted
    gap = math.log(0.5 / 0.4)
    p = 1 / (1 + math.exp(-(2.0 - gap)))
    assert JudgeScorer(_head_on_gap(p - 1e-3)).acceptable(b).tolist() == [True, True]
    assert JudgeScorer(_head_on_gap(0.5), threshold=p + 1e-3).acceptable(b).tolist() == [True, False]
    # without hidden states (not captured this step) it accepts nothing
    b.hidden_pre = None
    assert JudgeScorer(_head_on_gap(0.1)).acceptable(b).tolist() == [False, False]


def test_scorers_only_compute_the_positions_the_or_rule_consults():
    # row 0 lossless; row 1 lossy, standard kept its first token: only its second is asked
    rows = [([5, 6], [5, 8]), ([5, 6], [5, 8])]
    b = batch_of(rows, [[5, 8], [5, 8]], [False, True])
    assert b.consulted().tolist() == [3]
    b.hidden_pre = torch.zeros(4, 3)
    b.hidden_post = torch.zeros(4, 3)
    assert JudgeScorer(_head_on_gap(0.01), min_target_prob=0.0).acceptable(b).tolist() == \
        [False, False, False, True]
    b.rebuild = torch.tensor([False, True])
    assert b.consulted().tolist() == [2, 3]


def test_judge_features_shape():
    f = judge_features(torch.zeros(4, 3), torch.ones(4, 3), torch.zeros(4, V),
                       torch.tensor([1, 2, 3, 4]))
    assert f.shape == (4, 2 * 3 + len(LOGIT_FEATURES))


def test_head_files_round_trip_and_fail_clearly(tmp_path):
    d = tmp_path / "head"
    save_head(_head_on_gap(0.7), d)
    head = load_head(d)
    assert head.threshold == pytest.approx(0.7) and head.target.name == "toy"
    assert read_head_spec(d)["format"].startswith("vllm-spec-plugins/judge-head")
    with pytest.raises(JudgeFormatError, match="train-judge"):
        read_head_spec(tmp_path / "nothing")
    spec = json.loads((d / "judge.json").read_text())
    (d / "judge.json").write_text("{not json")
    with pytest.raises(JudgeFormatError, match="corrupt"):
        read_head_spec(d)
    spec["target"]["hidden_size"] = 5  # weights no longer fit
    (d / "judge.json").write_text(json.dumps(spec))
    with pytest.raises(JudgeFormatError, match="shape"):
        load_head(d)
    spec["target"]["hidden_size"] = 3
    spec["threshold"] = 1.5
    (d / "judge.json").write_text(json.dumps(spec))
    with pytest.raises(JudgeFormatError, match="threshold"):
        read_head_spec(d)
    spec["threshold"] = 0.7
    (d / "judge.json").write_text(json.dumps(spec))
    (d / "judge.safetensors").write_bytes(b"garbage")
    with pytest.raises(JudgeFormatError, match="corrupt"):
        load_head(d)
    os.remove(d / "judge.safetensors")
    with pytest.raises(JudgeFormatError, match="judge.safetensors"):
        read_head_spec(d)


def test_head_names_resolve_under_the_judges_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VSP_JUDGE_CACHE", str(tmp_path))
    assert resolve_head_path("qwen") == str(tmp_path / "qwen")
    assert resolve_head_path("./x/y") == "./x/y"


# ----------------------------------------------------------------------------- reflective
def test_reflective_fusion_accepts_what_the_target_keeps_on_reflection():
    b = batch_of([([6], [5])], [[5]], [True])
    b.target_logits = torch.stack([peaked(5, 0.6, 6, 0.3)])       # the target prefers 5
    b.reflective_logits = torch.stack([peaked(6, 0.95)])          # restating, it keeps 6
    assert ReflectiveScorer([1, 2]).acceptable(b).tolist() == [True]
    # weight 0: the original distribution alone -> its argmax 5, not the draft
    assert ReflectiveScorer([1, 2], fusion_weight=0.0).acceptable(b).tolist() == [False]
    # a token the target itself finds implausible is never accepted
    b.target_logits = torch.stack([peaked(5, 0.97, 6, 0.01)])
    assert ReflectiveScorer([1, 2], fusion_weight=1.0).acceptable(b).tolist() == [False]
    assert ReflectiveScorer([1, 2], fusion_weight=1.0,
                            min_target_prob=0.005).acceptable(b).tolist() == [True]
    # on reflection the target moves away from the draft: rejected
    b.target_logits = torch.stack([peaked(5, 0.6, 6, 0.3)])
    b.reflective_logits = torch.stack([peaked(5, 0.95)])
    assert ReflectiveScorer([1, 2]).acceptable(b).tolist() == [False]


def test_reflective_extension_fits_k():
    assert extend_draft([1, 2], [7, 8, 9]) == [1, 2, 7, 8, 9, 1, 2]
    assert max_real_draft(16, 4) == 6 and max_real_draft(5, 4) == 0
    with pytest.raises(ValueError):
        ReflectiveScorer([])


# ----------------------------------------------------------------------------- settings
def test_scorer_settings_errors_name_the_field():
    with pytest.raises(PluginConfigError, match=rf"{SCORER_KEY}\.fusion_weight"):
        scorer_config({SCORER_KEY: {"name": "reflective", "fusion_weight": 2}})
    with pytest.raises(PluginConfigError, match=rf"{SCORER_KEY}\.name"):
        scorer_config({SCORER_KEY: {"name": "maybe"}})
    with pytest.raises(PluginConfigError, match=rf"{SCORER_KEY}\.threshhold"):
        scorer_config({SCORER_KEY: {"name": "judge", "threshhold": 0.5}})
    with pytest.raises(PluginConfigError, match=rf"{SCORER_KEY}\.requests"):
        scorer_config({SCORER_KEY: {"name": "judge", "requests": "all"}})
    assert scorer_config({}) is None
    assert scorer_config({SCORER_KEY: {}}).lossless


def test_per_request_choice():
    assert request_lossy(None, "opt_out") is True
    assert request_lossy({"spec_lossy": False}, "opt_out") is False
    assert request_lossy({"spec_lossy": "false"}, "opt_out") is False
    assert request_lossy(None, "opt_in") is False
    assert request_lossy({"spec_lossy": True}, "opt_in") is True
    assert request_lossy({"other": 1}, "opt_in") is False


def test_shipped_scorer_configs_are_valid_and_ready_to_paste():
    import pathlib

    from vllm_spec_plugins.bench.methods import DEFAULT_CONFIGS_DIR, scorer_settings
    from vllm_spec_plugins.registry import resolve

    for name in ("judge", "reflective"):
        path = pathlib.Path(DEFAULT_CONFIGS_DIR) / f"scorer_{name}.json"
        cfg = json.loads(path.read_text())
        sc = scorer_config(cfg["additional_config"])
        assert sc.name == name and not sc.lossless
        assert scorer_settings(name) == cfg["additional_config"][SCORER_KEY]
    refl = json.loads((pathlib.Path(DEFAULT_CONFIGS_DIR) / "scorer_reflective.json").read_text())
    resolve(refl["additional_config"]["spec_plugins"])  # a valid method next to it
    # room for a draft next to the probe (SmolLM2's and Qwen's tokenizers: 4-5 tokens)
    assert max_real_draft(refl["speculative_config"]["num_speculative_tokens"], 5) >= 5
