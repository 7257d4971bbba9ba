"""bench/stats.py: spec-decode counter math and the per-cell summary.

Pure: runs and measurements are hand-written dicts shaped like the offline
worker's (token ids + texts) and the online client's (texts + latency)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from vllm_spec_plugins.bench import stats as S

B1, B8 = "batch 1", "batch 8"
CELLS = [("code", B1), ("code", B8)]


# --------------------------------------------------------------------------- counters


@dataclass
class _Counter:
    name: str
    value: int
    labels: dict


@dataclass
class _Vector:
    name: str
    values: list
    labels: dict


def test_spec_counters_sums_label_sets_and_ignores_other_metrics():
    metrics = [
        _Counter(S.M_DRAFTS, 10, {"engine": "0"}),
        _Counter(S.M_DRAFTS, 5, {"engine": "1"}),
        _Counter(S.M_DRAFT_TOKENS, 60, {}),
        _Counter(S.M_ACCEPTED, 30, {}),
        _Counter("vllm:prompt_tokens", 999, {}),
        _Vector(S.M_ACCEPTED_PER_POS, [9, 6, 3], {"engine": "0"}),
        _Vector(S.M_ACCEPTED_PER_POS, [1, 1, 1, 1], {"engine": "1"}),
    ]
    assert S.spec_counters(metrics) == {"drafts": 15, "draft_tokens": 60, "accepted": 30,
                                        "accepted_per_pos": [10, 7, 4, 1]}
    assert S.spec_counters([]) == S.empty_counters()


def test_counters_delta():
    before = {"drafts": 2, "draft_tokens": 16, "accepted": 5, "accepted_per_pos": []}
    after = {"drafts": 12, "draft_tokens": 96, "accepted": 35, "accepted_per_pos": [9, 8, 7]}
    assert S.counters_delta(before, after) == {"drafts": 10, "draft_tokens": 80, "accepted": 30,
                                               "accepted_per_pos": [9, 8, 7]}
    d = S.counters_delta({**after, "accepted_per_pos": [4, 4, 4]}, {**after, "accepted_per_pos": [5, 6, 7, 2]})
    assert d["accepted_per_pos"] == [1, 2, 3, 2] and d["drafts"] == 0


def test_sum_counters_pads_positions_and_skips_missing():
    s = S.sum_counters([
        {"drafts": 10, "draft_tokens": 80, "accepted": 30, "accepted_per_pos": [9, 8, 7]},
        {"drafts": 1, "draft_tokens": 8, "accepted": 1, "accepted_per_pos": [1, 0, 0, 0]},
        {},
    ])
    assert s == {"drafts": 11, "draft_tokens": 88, "accepted": 31, "accepted_per_pos": [10, 8, 7, 0]}


def test_acceptance_math():
    assert S.mean_acceptance_length(10, 25) == pytest.approx(3.5)
    assert S.mean_acceptance_length(0, 0) is None
    assert S.acceptance_per_position([8, 4, 2], 10) == pytest.approx([0.8, 0.4, 0.2])
    assert S.acceptance_per_position([8], 0) == []
    assert S.draft_acceptance_rate(80, 20) == pytest.approx(0.25)
    assert S.draft_acceptance_rate(0, 0) is None
    assert S.proposer_ms_per_step(0.5, 1000) == pytest.approx(0.5)
    assert S.proposer_ms_per_step(1.0, 0) is None


def test_drafter_delta():
    a = {"method": "suffix_tree", "steps": 10, "rows": 20, "drafted_tokens": 50,
         "propose_seconds": 0.25, "errors": 0, "tracked_requests": 3}
    b = dict(a, steps=30, rows=70, drafted_tokens=150, propose_seconds=1.0)
    assert S.drafter_delta(a, b) == {"steps": 20, "rows": 50, "drafted_tokens": 100,
                                     "propose_seconds": pytest.approx(0.75), "errors": 0}
    # the top-k capture time (Token Recycling) travels too when the drafter reports it
    cap = S.drafter_delta(dict(a, capture_seconds=0.5), dict(b, capture_seconds=0.75))
    assert cap["capture_seconds"] == pytest.approx(0.25)
    assert S.drafter_delta(None, b) is None and S.drafter_delta(a, None) is None
    curve = {"observations": 12, "curve": {"0.90": 0.4}}
    with_stats = S.drafter_delta(dict(a, proposer_stats=None), dict(b, proposer_stats=curve))
    assert with_stats["proposer_stats"] == curve and with_stats["steps"] == 20
    # the draft budget's per-cell counters (proposed -> kept -> accepted)
    budget0 = {"proposed_tokens": 100, "kept_tokens": 60, "accepted_tokens": 40, "price": 0.3}
    budget1 = {"proposed_tokens": 180, "kept_tokens": 90, "accepted_tokens": 70, "price": 0.4}
    cell = S.drafter_delta(dict(a, draft_budget=budget0), dict(b, draft_budget=budget1))
    assert cell["draft_budget"] == {"proposed_tokens": 80, "kept_tokens": 30,
                                    "accepted_tokens": 30, "price": 0.4, "enabled": True}
    off = S.drafter_delta(dict(a, draft_budget=budget0),
                          dict(b, draft_budget=dict(budget1, enabled=False)))
    assert off["draft_budget"]["enabled"] is False
    assert "draft_budget" not in S.drafter_delta(a, b)


def test_draft_time_delta():
    a, b = {"seconds": 0.5, "calls": 10}, {"seconds": 2.0, "calls": 40}
    assert S.draft_time_delta(a, b) == {"seconds": pytest.approx(1.5), "calls": 30}
    assert S.draft_time_delta(None, b) is None and S.draft_time_delta(a, None) is None


def test_median_spread_and_first_difference():
    assert S.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert S.median_spread([1.0, 4.0]) == (2.5, 1.0, 4.0)
    assert S.median_spread([None, 5.0]) == (5.0, 5.0, 5.0)
    assert S.median_spread([None]) == (None, None, None)
    assert S.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert S.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert S.first_difference([1, 2], [1]) == 1
    assert S.first_difference("abc", "abd") == 2


def test_compare_outputs():
    ref = [[1, 2, 3], [4, 5], [6], []]
    assert S.compare_outputs(ref, [[1, 2, 3], [4, 5], [6], []]) == []
    assert S.compare_outputs(ref, [[1, 9, 3], [4, 5, 7], [6], [1]]) == [(0, 1), (1, 2), (3, 0)]
    with pytest.raises(ValueError, match="output counts differ: 4 vs 2"):
        S.compare_outputs(ref, ref[:2])


def test_comparable_outputs_prefers_token_ids_then_joins_turns():
    assert S.comparable_outputs({"token_ids": [[1, 2]], "texts": [["x"]]}) == [[1, 2]]
    joined = S.comparable_outputs({"texts": [["a", "b"], ["c"]]})
    assert joined == ["a" + S.TEXT_TURN_SEPARATOR + "b", "c"]
    # the turn boundary counts: "ab" in one turn is not "a" then "b"
    assert S.comparable_outputs({"texts": [["ab"]]}) != S.comparable_outputs({"texts": [["a", "b"]]})
    assert S.comparable_outputs({"wall_s": 1.0}) is None


# --------------------------------------------------------------------------- summarize

IDS = [[1, 2, 3], [4, 5, 6]]
SPEC = {"drafts": 10, "draft_tokens": 80, "accepted": 40, "accepted_per_pos": [9, 8, 7, 6, 4, 3, 2, 1]}


def meas(scenario, tokens, wall, ids=IDS, spec=None, drafter=None, workload="code", **extra):
    m = {"workload": workload, "scenario": scenario, "wall_s": wall, "num_prompts": len(ids),
         "output_tokens": tokens, "token_ids": ids, "texts": [["t"] for _ in ids],
         "spec": spec, "drafter": drafter}
    m.update(extra)
    return m


def online_meas(scenario, tokens, wall, texts, latency=None, spec=None, workload="chat"):
    return {"workload": workload, "scenario": scenario, "wall_s": wall, "output_tokens": tokens,
            "texts": texts, "spec": spec, "drafter": None, "latency": latency or {}}


def run(label, repeat, measurements, status="ok", **extra):
    return {"label": label, "repeat": repeat, "status": status, "measurements": measurements, **extra}


def failed(label, repeat, error="worker exited with code 1: RuntimeError: boom"):
    return {"label": label, "repeat": repeat, "status": "failed", "error": error}


DRAFTER = {"steps": 50, "rows": 50, "drafted_tokens": 400, "propose_seconds": 0.05, "errors": 0}


def two_scenario_runs():
    """none and suffix_tree, 2 repeats, scenarios batch 1 / batch 8 of one workload.

    tok/s           batch 1        batch 8
    none      r0    100/10 = 10    100/2   = 50
              r1    100/8  = 12.5  100/2.5 = 40
    suffix    r0    100/5  = 20    100/2   = 50
              r1    100/2.5= 40    100/4   = 25
    """
    diff = [[1, 2, 3], [4, 7, 6]]
    return [
        run("none", 0, [meas(B1, 100, 10.0), meas(B8, 100, 2.0)]),
        run("suffix_tree", 0, [meas(B1, 100, 5.0, spec=SPEC, drafter=DRAFTER),
                               meas(B8, 100, 2.0, spec=SPEC, drafter=DRAFTER)]),
        run("suffix_tree", 1, [meas(B1, 100, 2.5, spec=SPEC, drafter=DRAFTER),
                               meas(B8, 100, 4.0, ids=diff, spec=SPEC, drafter=DRAFTER)]),
        run("none", 1, [meas(B1, 100, 8.0), meas(B8, 100, 2.5)]),
    ]


def rows_by(rows):
    return {(r["scenario"], r["method"]): r for r in rows}


def test_summarize_one_row_per_cell_and_method_in_order():
    rows = S.summarize(two_scenario_runs(), ["none", "suffix_tree"], CELLS)
    assert [(r["workload"], r["scenario"], r["method"]) for r in rows] == [
        ("code", B1, "none"), ("code", B1, "suffix_tree"),
        ("code", B8, "none"), ("code", B8, "suffix_tree")]
    json.dumps(rows)  # results.json


def test_summarize_tokens_per_s_median_and_spread_per_scenario():
    by = rows_by(S.summarize(two_scenario_runs(), ["none", "suffix_tree"], CELLS))
    assert by[(B1, "none")]["tokens_per_s"] == pytest.approx(11.25)
    assert by[(B8, "none")]["tokens_per_s"] == pytest.approx(45.0)
    st = by[(B1, "suffix_tree")]
    assert st["tokens_per_s_all"] == pytest.approx([20.0, 40.0])  # repeat order
    assert (st["tokens_per_s"], st["tokens_per_s_min"], st["tokens_per_s_max"]) == pytest.approx((30.0, 20.0, 40.0))


def test_summarize_speedup_paired_per_repeat_and_scenario():
    by = rows_by(S.summarize(two_scenario_runs(), ["none", "suffix_tree"], CELLS))
    # batch 1: 20/10 and 40/12.5; batch 8: 50/50 and 25/40
    assert by[(B1, "suffix_tree")]["speedup_all"] == pytest.approx([2.0, 3.2])
    assert by[(B1, "suffix_tree")]["speedup"] == pytest.approx(2.6)
    assert by[(B8, "suffix_tree")]["speedup_all"] == pytest.approx([1.0, 0.625])
    assert (by[(B8, "suffix_tree")]["speedup_min"], by[(B8, "suffix_tree")]["speedup_max"]) == \
        pytest.approx((0.625, 1.0))
    assert by[(B1, "none")]["speedup_all"] == pytest.approx([1.0, 1.0])


def test_summarize_equality_on_token_ids_per_scenario():
    by = rows_by(S.summarize(two_scenario_runs(), ["none", "suffix_tree"], CELLS))
    b1, b8 = by[(B1, "suffix_tree")], by[(B8, "suffix_tree")]
    assert (b1["identical"], b1["compared"], b1["mismatches"]) == (4, 4, [])
    assert (b8["identical"], b8["compared"]) == (3, 4)
    assert b8["mismatches"] == [{"repeat": 1, "prompt": 1, "position": 1}]
    # the baseline is compared with its own repeat 0 (determinism), not with itself
    assert (by[(B1, "none")]["identical"], by[(B1, "none")]["compared"]) == (2, 2)


def test_summarize_baseline_nondeterminism_is_a_mismatch():
    runs = [run("none", 0, [meas(B1, 10, 1.0)]), run("none", 1, [meas(B1, 10, 1.0, ids=[[1, 2, 3], [4, 5]])])]
    (row,) = S.summarize(runs, ["none"], [("code", B1)])
    assert (row["identical"], row["compared"]) == (1, 2)
    assert row["mismatches"] == [{"repeat": 1, "prompt": 1, "position": 2}]


def test_summarize_baseline_single_repeat_is_not_compared():
    (row,) = S.summarize([run("none", 0, [meas(B1, 10, 1.0)])], ["none"], [("code", B1)])
    assert row["identical"] is None and row["compared"] is None and row["speedup"] == 1.0


def test_summarize_equality_on_texts_for_online_measurements():
    base = [["Hello", "World"], ["Sure."]]
    runs = [run("none", 0, [online_meas("online c=1", 20, 1.0, base)]),
            run("ngram", 0, [online_meas("online c=1", 20, 0.5, [["Hello", "World!"], ["Sure."]])]),
            run("suffix_tree", 0, [online_meas("online c=1", 20, 0.8, [list(t) for t in base])])]
    by = {r["method"]: r for r in S.summarize(runs, ["none", "ngram", "suffix_tree"], [("chat", "online c=1")])}
    assert (by["suffix_tree"]["identical"], by["suffix_tree"]["compared"]) == (2, 2)
    assert (by["ngram"]["identical"], by["ngram"]["compared"]) == (1, 2)
    # first difference is in the joined text: "Hello" + separator + "World" is 11 chars
    assert by["ngram"]["mismatches"] == [{"repeat": 0, "prompt": 0, "position": 11}]
    assert by["ngram"]["speedup"] == pytest.approx(2.0)


def test_summarize_text_turns_are_compared_with_their_boundaries():
    runs = [run("none", 0, [online_meas("online c=1", 2, 1.0, [["ab"]])]),
            run("ngram", 0, [online_meas("online c=1", 2, 1.0, [["a", "b"]])])]
    by = {r["method"]: r for r in S.summarize(runs, ["none", "ngram"], [("chat", "online c=1")])}
    assert by["ngram"]["identical"] == 0 and by["ngram"]["compared"] == 1


def test_summarize_lossless_map_flags_lossy_methods():
    runs = two_scenario_runs() + [run("fancy", 0, [meas(B1, 100, 4.0, spec=SPEC), meas(B8, 100, 1.0, spec=SPEC)])]
    rows = S.summarize(runs, ["none", "suffix_tree", "fancy"], CELLS, lossless={"fancy": False})
    flags = {(r["scenario"], r["method"]): r["lossless"] for r in rows}
    assert flags[(B1, "fancy")] is False and flags[(B8, "fancy")] is False
    assert flags[(B1, "suffix_tree")] is True and flags[(B1, "none")] is True  # default: lossless


def test_summarize_spec_counters_acceptance_and_proposer_time():
    by = rows_by(S.summarize(two_scenario_runs(), ["none", "suffix_tree"], CELLS))
    st = by[(B1, "suffix_tree")]
    assert st["spec"]["drafts"] == 20 and st["spec"]["accepted"] == 80  # two repeats summed
    assert st["mean_acceptance_length"] == pytest.approx(1 + 80 / 20)
    assert st["draft_acceptance_rate"] == pytest.approx(80 / 160)
    assert st["acceptance_per_position"][:2] == pytest.approx([18 / 20, 16 / 20])
    assert st["proposer_ms_per_step"] == pytest.approx(1.0)      # 0.1 s / 100 steps
    assert st["proposer_share"] == pytest.approx(0.1 / 7.5)      # of 5.0 + 2.5 s wall
    none = by[(B1, "none")]
    assert none["spec"] == S.empty_counters() and none["mean_acceptance_length"] is None
    assert none["proposer_ms_per_step"] is None and none["proposer_share"] is None
    # no runner draft timer in these runs: no drafting overhead claimed
    assert st["draft_ms_per_step"] is None and st["draft_share"] is None


def test_summarize_draft_budget_summed_over_repeats_price_median():
    def budget(proposed, kept, accepted, price, rows=10, emptied=2):
        return {"rows": rows, "rows_cut": 4, "rows_emptied": emptied, "proposed_tokens": proposed,
                "kept_tokens": kept, "tokens_saved": proposed - kept, "verified_rows": 8,
                "accepted_tokens": accepted, "price": price, "enabled": True}

    runs = [run("none", 0, [meas(B1, 100, 10.0)]), run("none", 1, [meas(B1, 100, 10.0)]),
            run("suffix_tree", 0, [meas(B1, 100, 5.0, spec=SPEC,
                                        drafter=dict(DRAFTER, draft_budget=budget(80, 50, 30, 0.2)))]),
            run("suffix_tree", 1, [meas(B1, 100, 5.0, spec=SPEC,
                                        drafter=dict(DRAFTER, draft_budget=budget(60, 20, 10, 0.4)))])]
    by = rows_by(S.summarize(runs, ["none", "suffix_tree"], [("code", B1)]))
    b = by[(B1, "suffix_tree")]["draft_budget"]
    assert (b["proposed_tokens"], b["kept_tokens"], b["accepted_tokens"]) == (140, 70, 40)
    assert (b["rows"], b["rows_emptied"], b["tokens_saved"]) == (20, 4, 70)
    assert b["price"] == pytest.approx(0.3) and b["enabled"] is True
    assert by[(B1, "none")]["draft_budget"] is None


def test_summarize_draft_time_for_builtin_and_plugin_methods():
    """Drafting overhead comes from the runner's timer for every method (vLLM's
    ngram too); a plugin's top-k capture time is added to it."""
    runs = [run("none", 0, [meas(B1, 100, 10.0)]),
            run("ngram", 0, [meas(B1, 100, 4.0, spec=SPEC, draft_time={"seconds": 0.2, "calls": 100})]),
            run("token_recycling", 0, [meas(B1, 100, 5.0, spec=SPEC,
                                            drafter=dict(DRAFTER, capture_seconds=0.1),
                                            draft_time={"seconds": 0.4, "calls": 50})])]
    rows = rows_by(S.summarize(runs, ["none", "ngram", "token_recycling"], [("code", B1)]))
    assert rows[(B1, "ngram")]["draft_ms_per_step"] == pytest.approx(2.0)       # 0.2 s / 100
    assert rows[(B1, "ngram")]["draft_share"] == pytest.approx(0.2 / 4.0)
    assert rows[(B1, "ngram")]["proposer_ms_per_step"] is None                  # no plugin drafter
    tr = rows[(B1, "token_recycling")]
    assert tr["draft_ms_per_step"] == pytest.approx(1000 * 0.5 / 50)            # (0.4 + 0.1) / 50
    assert tr["draft_share"] == pytest.approx(0.5 / 5.0)
    assert rows[(B1, "none")]["draft_ms_per_step"] is None


def test_summarize_task_score_median():
    def task(score):
        return {"scorer": "exact_match", "metric": "exact match", "score": score, "passed": 0, "n": 2}

    runs = [run("none", r, [meas(B1, 10, 1.0, task=task(s))]) for r, s in enumerate([0.5, 1.0, 0.0])]
    runs.append(run("ngram", 0, [meas(B1, 10, 1.0)]))  # unscored
    by = {r["method"]: r for r in S.summarize(runs, ["none", "ngram"], [("code", B1)])}
    assert by["none"]["task_score"] == pytest.approx(0.5)
    assert by["none"]["task_metric"] == "exact match"
    assert by["ngram"]["task_score"] is None and by["ngram"]["task_metric"] is None


def test_summarize_latency_medians():
    def lat(x):
        return {k: x * (i + 1) for i, k in enumerate(S.LATENCY_KEYS)}

    runs = [run("none", 0, [online_meas("online c=4", 10, 1.0, [["a"]], latency=lat(10.0))]),
            run("none", 1, [online_meas("online c=4", 10, 1.0, [["a"]], latency=lat(30.0))]),
            run("none", 2, [online_meas("online c=4", 10, 1.0, [["a"]], latency=lat(20.0))])]
    (row,) = S.summarize(runs, ["none"], [("chat", "online c=4")])
    for i, k in enumerate(S.LATENCY_KEYS):
        assert row[k] == pytest.approx(20.0 * (i + 1)), k
    # offline rows have no latency
    (off,) = S.summarize(two_scenario_runs()[:1], ["none"], [("code", B1)])
    assert all(off[k] is None for k in S.LATENCY_KEYS)


def test_summarize_failed_repeat_and_failed_method():
    runs = two_scenario_runs() + [failed("ngram", 0),
                                  run("ngram", 1, [meas(B1, 100, 4.0, spec=SPEC), meas(B8, 100, 2.0, spec=SPEC)]),
                                  failed("eagle", 0), failed("eagle", 1)]
    by = rows_by(S.summarize(runs, ["none", "ngram", "eagle"], CELLS))
    ng = by[(B1, "ngram")]
    assert ng["status"] == "ok" and (ng["repeats_ok"], ng["repeats_total"]) == (1, 2)
    assert ng["speedup_all"] == pytest.approx([25.0 / 12.5])  # paired with none's repeat 1
    eagle = by[(B8, "eagle")]
    assert eagle["status"] == "failed" and (eagle["repeats_ok"], eagle["repeats_total"]) == (0, 2)
    assert eagle["tokens_per_s"] is None and eagle["speedup"] is None
    assert eagle["identical"] is None and eagle["compared"] is None
    assert [r["label"] for r in S.failures(runs)] == ["ngram", "eagle", "eagle"]


def test_summarize_failed_baseline_repeat_pairs_only_available_repeats():
    runs = two_scenario_runs()
    runs[3] = failed("none", 1)
    by = rows_by(S.summarize(runs, ["none", "suffix_tree"], CELLS))
    st = by[(B8, "suffix_tree")]
    assert st["speedup_all"] == pytest.approx([1.0])  # repeat 1 has no baseline to pair with
    # equality of repeat 1 falls back to the baseline's first repeat
    assert (st["identical"], st["compared"]) == (3, 4)
    assert st["mismatches"] == [{"repeat": 1, "prompt": 1, "position": 1}]


def test_summarize_missing_baseline():
    runs = [run("suffix_tree", 0, [meas(B1, 10, 1.0, spec=SPEC)])]
    (row,) = S.summarize(runs, ["suffix_tree"], [("code", B1)])
    assert row["status"] == "ok" and row["tokens_per_s"] == pytest.approx(10.0)
    assert row["speedup"] is None and row["speedup_all"] == []
    assert row["identical"] is None and row["compared"] is None and row["mismatches"] == []


def test_summarize_cell_missing_from_a_run_is_not_ok_for_that_cell():
    runs = [run("none", 0, [meas(B1, 10, 1.0), meas(B8, 10, 1.0)]),
            run("ngram", 0, [meas(B1, 10, 0.5)])]
    by = rows_by(S.summarize(runs, ["none", "ngram"], CELLS))
    assert by[(B1, "ngram")]["status"] == "ok" and by[(B1, "ngram")]["speedup"] == pytest.approx(2.0)
    assert by[(B8, "ngram")]["status"] == "failed" and by[(B8, "ngram")]["repeats_total"] == 1
