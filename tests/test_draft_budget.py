"""The shared draft budget (integration/draft_budget.py): calibration of the
proposers' acceptance estimates, the cut at the measured price, exploration,
and the budget inside the drafter, driven by the stand-in runner. No engine:
tests/test_engine_suffix_tree.py runs the budget on the real engine."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest

from recording_proposer import RecordingProposer  # noqa: F401 (built by name)
from vllm_spec_plugins.bench.standin_runner import StandInRequest, StandInRunner, vllm_config
from vllm_spec_plugins.config import DraftBudgetConfig, SuffixTreeConfig
from vllm_spec_plugins.engine_config import PluginConfigError, draft_budget_config
from vllm_spec_plugins.integration.draft_budget import AcceptanceCalibrator, DraftBudget
from vllm_spec_plugins.integration.drafter import PluginDrafter
from vllm_spec_plugins.proposers.base import ScoredDraft
from vllm_spec_plugins.proposers.suffix_tree import SuffixTreeProposer, suffix_stratum
from vllm_spec_plugins.registry import resolve

PROPOSER = "recording_proposer:RecordingProposer"


class FixedPrice:
    def __init__(self, price):
        self.price = price

    def token_price(self, rows=1):
        return self.price

    def needs_exploration(self, rows=1):
        return self.price is None


def budget(price=None, **cfg):
    return DraftBudget(DraftBudgetConfig(**cfg), FixedPrice(price))


# ------------------------------------------------------------------ calibration
def test_calibration_learns_the_real_acceptance_per_stratum():
    cal = AcceptanceCalibrator(prior_weight=8, half_life_tokens=10**6)
    rng = random.Random(0)
    for _ in range(2000):  # stratum 3 claims 1.0, is right 30% of the time
        cal.observe(3, [1.0], verified=1, accepted=int(rng.random() < 0.3))
    for _ in range(2000):  # stratum 5 claims 0.5, is right 90% of the time
        cal.observe(5, [0.5], verified=1, accepted=int(rng.random() < 0.9))
    assert cal.calibrated(3, [1.0])[0] == pytest.approx(0.3, abs=0.05)
    assert cal.calibrated(5, [0.5])[0] == pytest.approx(0.9, abs=0.05)
    # Overall, accepted tokens per estimated one: (600 + 1800) / (2000 + 1000).
    overall = cal.stratum_ratio(7)
    assert overall == pytest.approx(2400 / 3000, abs=0.02)
    # A stratum without evidence: the estimate scaled by what every stratum did.
    assert cal.calibrated(7, [0.42])[0] == pytest.approx(0.42 * overall)
    assert AcceptanceCalibrator().calibrated(7, [0.42]) == [pytest.approx(0.42)]


def test_an_overconfident_stratum_is_discounted_in_bins_it_was_never_seen_in():
    # A one-token suffix match says 0.95 and is right 10% of the time: its
    # 0.6 estimates (never observed yet) are discounted too, not trusted as 0.6.
    cal = AcceptanceCalibrator(prior_weight=8, half_life_tokens=10**6)
    rng = random.Random(1)
    for _ in range(500):
        cal.observe(0, [0.95], verified=1, accepted=int(rng.random() < 0.1))
    for _ in range(500):
        cal.observe(9, [0.95], verified=1, accepted=int(rng.random() < 0.95))
    assert cal.calibrated(0, [0.6])[0] < 0.15
    assert cal.calibrated(9, [0.6])[0] == pytest.approx(0.6, abs=0.05)


def test_observe_counts_a_token_only_where_it_was_tried():
    cal = AcceptanceCalibrator()
    cal.observe(0, [0.95, 0.95, 0.95, 0.95], verified=4, accepted=1)
    # token 0 accepted, token 1 tried and rejected, tokens 2-3 never tried
    assert cal.trials[0].sum() == 2 and cal.hits[0].sum() == 1
    cal.observe(0, [0.95, 0.95], verified=2, accepted=2)
    assert cal.trials[0].sum() == 4 and cal.hits[0].sum() == 3


def test_old_evidence_fades():
    cal = AcceptanceCalibrator(prior_weight=1, half_life_tokens=256)
    for _ in range(3000):
        cal.observe(0, [0.95], 1, 1)
    for _ in range(3000):
        cal.observe(0, [0.95], 1, 0)
    assert cal.calibrated(0, [0.95])[0] < 0.05  # the workload changed: so did the curve


# ----------------------------------------------------------------------- cut
def test_cut_keeps_tokens_whose_expected_gain_beats_the_price():
    b = budget(0.5, calibrate=False)
    price = b.step_price(1)
    assert price == 0.5
    toks, rec = b.cut(ScoredDraft([1, 2, 3, 4], [0.9, 0.9, 0.5, 1.0]), price)
    assert toks == [1, 2]  # cumulative 0.9, 0.81, then 0.405 < 0.5
    assert rec.expected == pytest.approx(0.9 + 0.81)
    assert b.stats["tokens_saved"] == 2 and b.stats["rows_cut"] == 1
    toks, rec = b.cut(ScoredDraft([7], [0.3]), price)
    assert toks == [] and rec is None and b.stats["rows_emptied"] == 1


def test_disabled_budget_passes_drafts_through_up_to_k():
    b = budget(0.9, enabled=False)
    price = b.step_price(32)
    toks, _ = b.cut(ScoredDraft([1, 2, 3, 4], [0.1, 0.1, 0.1, 0.1]), price, 3)
    assert toks == [1, 2, 3]


def test_no_estimate_is_learnt_per_position():
    b = budget(0.5)
    assert b.cut(ScoredDraft([1, 2]), 0.5)[0] == [1, 2]  # no evidence: taken as certain
    for _ in range(300):  # nothing this proposer drafts is ever accepted
        _, rec = b.cut(ScoredDraft([1, 2]), 0.5)
        if rec is None:
            break
        b.observe(rec, verified=2, accepted=0)
    assert b.cut(ScoredDraft([1, 2]), 0.5)[0] == []


def test_price_is_measured_when_known_else_the_fallback():
    b = budget(0.6, fallback_price=0.1, fallback_rows_slope=0.5)
    assert [b.step_price(3) for _ in range(4)] == [0.6] * 4
    unmeasured = budget(None, fallback_price=0.1, fallback_rows_slope=0.5)
    assert unmeasured.step_price(3) == pytest.approx(0.2)  # 0.1 * (1 + 0.5 * 2)
    assert unmeasured.step_price(200) == pytest.approx(0.95)  # capped


def test_an_unmeasured_draft_cost_is_explored_on_one_step_in_n():
    # At 32 rows the fallback price (0.875) keeps nearly every draft out, so
    # the step cost could never see a draft: one step in 8 drafts as at one row.
    b = budget(None, fallback_price=0.1, fallback_rows_slope=0.25)
    prices = [b.step_price(32) for _ in range(32)]
    assert prices.count(pytest.approx(0.1)) == 4
    assert prices.count(pytest.approx(0.875)) == 28
    assert b.snapshot()["exploration_steps"] == 4
    never = budget(None, fallback_price=0.1, fallback_rows_slope=0.25, explore_every=0)
    assert all(never.step_price(32) == pytest.approx(0.875) for _ in range(32))
    measured = budget(0.6, explore_every=1)
    assert {measured.step_price(32) for _ in range(16)} == {0.6}


def test_optimism_tries_rare_evidence_and_drops_evidence_known_to_fail():
    b = budget(0.5, optimism=1.0, prior_weight=8)
    rare = ScoredDraft([5], [0.45], 2)  # no evidence: 0.45 + 1 sd of it (n = 8) > 0.5
    assert b.cut(rare, 0.5)[0] == [5]
    assert budget(0.5, optimism=0.0).cut(rare, 0.5)[0] == []
    for _ in range(300):  # stratum 3 is always rejected
        b.calibrator.observe(3, [0.99], verified=1, accepted=0)
    assert b.cut(ScoredDraft([5], [0.99], 3), 0.1)[0] == []
    # the record keeps the honest (mean) expectation, not the optimistic one
    fresh = budget(0.1, optimism=1.0)
    _, rec = fresh.cut(ScoredDraft([5, 6], [0.6, 0.5], 7), 0.1)
    assert rec.expected == pytest.approx(0.6 + 0.6 * 0.5)


# -------------------------------------------------------------------- config
def test_budget_settings_are_validated_with_the_field_named():
    assert draft_budget_config({"method": "suffix_tree"}).enabled
    assert not draft_budget_config({"draft_budget": {"enabled": False}}).enabled
    with pytest.raises(PluginConfigError, match=r"spec_plugins\.draft_budget\.fallback_price"):
        resolve({"method": "suffix_tree", "draft_budget": {"fallback_price": 2}})
    with pytest.raises(PluginConfigError, match=r"draft_budget\.explore_every"):
        resolve({"method": "token_recycling", "draft_budget": {"explore_every": -1}})
    with pytest.raises(PluginConfigError, match=r"draft_budget\.explore_evry"):
        resolve({"method": "token_recycling", "draft_budget": {"explore_evry": 3}})
    with pytest.raises(PluginConfigError, match="must be a JSON object"):
        resolve({"method": "suffix_tree", "draft_budget": 0.5})
    method, _, cfg = resolve({"method": "suffix_tree", "draft_budget": {}})
    assert method == "suffix_tree" and isinstance(cfg, SuffixTreeConfig)


# ----------------------------------------------------- the proposers' estimates
def test_suffix_tree_reports_count_ratios_and_a_stratum():
    p = SuffixTreeProposer(SuffixTreeConfig(use_global_cache=False), 8)
    # after "1 2" came 3 twice and 4 once; after "2 3" always 9
    prompt = np.array([1, 2, 3, 9, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2], np.int32)
    st = p.start_request("r", prompt)
    d = p.propose_scored_batch([(st, prompt, 8)])[0]
    assert d.tokens[:2] == [3, 9]
    assert d.probs[0] == pytest.approx(2 / 3) and d.probs[1] == pytest.approx(1.0)
    assert d.stratum == suffix_stratum(2, 0)
    assert p.propose(st, prompt, 8) == d.tokens
    assert suffix_stratum(1, 0) == 0 and suffix_stratum(40, 1) == 13


# ------------------------------------------------- the budget in the drafter
def make(settings=None, k=8):
    cfg = vllm_config({"method": PROPOSER, **(settings or {})}, k=k)
    return PluginDrafter(cfg, patch_runner=False, ranks=(0, 0, 1))


def periodic(n, period=7, base=100):
    return [base + (i % period) for i in range(n)]


def run_wrong_drafts(budget_settings):
    d = make({"wrong_drafts": True, "draft_budget": budget_settings})
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(420)[20:]))
    drafted = []
    while r.rows:
        drafted.append(sum(len(x) for x in r.step()))
    r.step()
    assert r.rows == [] and r.accepted == 0  # lossless: the output is the target's
    return d, drafted


def test_budget_stops_drafts_that_never_pay():
    d, drafted = run_wrong_drafts({})
    late = drafted[len(drafted) // 2:]
    # the evidence is overwhelming by then: nothing is tried any more
    assert sum(late) == 0, late
    snap = d.snapshot()["draft_budget"]
    assert snap["tokens_saved"] > 0 and snap["rows_emptied"] > 0
    assert snap["accepted_tokens"] == 0 and snap["verified_rows"] > 0
    assert snap["calibration"]  # the curve is in the drafter snapshot


def test_without_the_budget_the_same_drafts_are_all_sent():
    _, drafted = run_wrong_drafts({"enabled": False})
    assert all(n == 8 for n in drafted[:-1])


def test_budget_keeps_drafts_that_pay():
    d = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(420)[20:]))
    r.run()
    snap = d.snapshot()["draft_budget"]
    assert r.accepted > 300 and snap["kept_tokens"] > 300
    # every verified draft is accounted for, except the finishing step's (no step follows)
    assert r.accepted - 8 <= snap["accepted_tokens"] <= r.accepted


def test_a_row_whose_drafts_were_not_scheduled_teaches_nothing():
    d = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(60)[20:]))
    r.step()
    r.step()
    before = d.budget.calibrator.observed_tokens
    r.drafts = {}  # the scheduler dropped this step's drafts (e.g. out of token budget)
    r.step()
    assert d.budget.calibrator.observed_tokens == before


# ------------------------------------------------- the calibration as a state file
def test_calibration_survives_a_restart_through_its_state_file(tmp_path):
    path = tmp_path / "budget.npz"
    d, _ = run_wrong_drafts({"state_path": str(path)})
    assert d.saver.save_now() and path.is_file()
    learnt = d.budget.calibrator
    again = make({"wrong_drafts": True, "draft_budget": {"state_path": str(path)}})
    cal = again.budget.calibrator
    assert np.array_equal(cal.hits, learnt.hits) and np.array_equal(cal.trials, learnt.trials)
    assert cal.observed_tokens == learnt.observed_tokens > 0
    assert again.snapshot()["draft_budget"]["loaded_tokens"] == learnt.observed_tokens
    # what it learnt applies from the first step: no drafts are tried at all now
    r = StandInRunner(again)
    r.add(StandInRequest("b", periodic(20), periodic(200)[20:]))
    drafted = []
    while r.rows:
        drafted.append(sum(len(x) for x in r.step()))
    assert sum(drafted) == 0, drafted
    fresh = make({"wrong_drafts": True})  # without the file the same run tries first
    r = StandInRunner(fresh)
    r.add(StandInRequest("b", periodic(20), periodic(200)[20:]))
    drafted = []
    while r.rows:
        drafted.append(sum(len(x) for x in r.step()))
    assert sum(drafted) > 0


def test_budget_state_file_of_another_method_or_damaged_fails_at_startup(tmp_path):
    path = tmp_path / "budget.npz"
    b = budget(state_path=str(path))
    b.method = "token_recycling"
    b.calibrator.observe(0, [0.9, 0.9], verified=2, accepted=1)
    assert b.save_state()
    with pytest.raises(ValueError, match=r"draft_budget\.state_path: .*saved by method "
                                         r"'token_recycling', this engine runs .*delete the file"):
        make({"draft_budget": {"state_path": str(path)}})
    path.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"draft_budget\.state_path: .*not a draft-budget state file"):
        make({"draft_budget": {"state_path": str(path)}})
    np.savez(path, version=np.int64(1), method=np.array(PROPOSER), hits=np.ones((3, 3)),
             trials=np.ones((3, 3)), estimates=np.ones((3, 3)), observed_tokens=np.int64(3))
    with pytest.raises(ValueError, match=r"damaged draft-budget state file \(hits has shape"):
        make({"draft_budget": {"state_path": str(path)}})
    with pytest.raises(ValueError, match=r"spec_plugins\.draft_budget\.state_path: directory .* does not exist"):
        make({"draft_budget": {"state_path": str(tmp_path / "nope" / "b.npz")}})


def test_no_state_path_saves_nothing(tmp_path):
    b = budget()
    assert b.save_state() is False and b.snapshot()["loaded_tokens"] == 0
