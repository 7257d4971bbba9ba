"""bench/report.py: Markdown tables, the whole report, and the PNG plots.

Pure: rows come from ``stats.summarize`` over hand-written runs (two scenarios
of one workload, as ``--batch-sizes 1,8`` gives)."""

from __future__ import annotations

import struct

import pytest

from vllm_spec_plugins.bench import report as R
from vllm_spec_plugins.bench import stats as S

B1, B8 = "batch 1", "batch 8"
CELLS = [("code", B1), ("code", B8)]
IDS = [[1, 2, 3], [4, 5, 6]]
DIFF = [[1, 2, 3], [4, 7, 6]]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def meas(scenario, tokens, wall, ids=IDS, spec=None, drafter=None, workload="code", **extra):
    return {"workload": workload, "scenario": scenario, "wall_s": wall, "output_tokens": tokens,
            "token_ids": ids, "texts": [["t"] for _ in ids], "spec": spec, "drafter": drafter, **extra}


def run(label, repeat, measurements):
    return {"label": label, "repeat": repeat, "status": "ok", "measurements": measurements}


def spec(drafts, accepted_per_pos, k=8):
    return {"drafts": drafts, "draft_tokens": drafts * k, "accepted": sum(accepted_per_pos),
            "accepted_per_pos": list(accepted_per_pos)}


SPEC_B1 = spec(10, [8, 4])
SPEC_B8 = spec(30, [12, 6])
DRAFTER = {"steps": 50, "propose_seconds": 0.05}
DRAFT_TIME = {"seconds": 0.1, "calls": 50}
FAILED_NGRAM = {"label": "ngram", "repeat": 0, "status": "failed",
                "error": "worker exited with code 1: RuntimeError: boom"}


def runs_fixture():
    """none / ngram (repeat 0 failed) / suffix_tree (mismatch in batch 8) / fancy (lossy, mismatches)."""
    return [
        run("none", 0, [meas(B1, 100, 10.0), meas(B8, 100, 2.0)]),
        run("suffix_tree", 0, [meas(B1, 100, 5.0, spec=SPEC_B1, drafter=DRAFTER, draft_time=DRAFT_TIME),
                               meas(B8, 100, 2.0, spec=SPEC_B8, drafter=DRAFTER, draft_time=DRAFT_TIME)]),
        run("fancy", 0, [meas(B1, 100, 2.0, ids=DIFF, spec=SPEC_B1), meas(B8, 100, 1.0, spec=SPEC_B8)]),
        FAILED_NGRAM,
        run("none", 1, [meas(B1, 100, 8.0), meas(B8, 100, 2.5)]),
        run("suffix_tree", 1, [meas(B1, 100, 2.5, spec=SPEC_B1, drafter=DRAFTER, draft_time=DRAFT_TIME),
                               meas(B8, 100, 4.0, ids=DIFF, spec=SPEC_B8, drafter=DRAFTER,
                                    draft_time=DRAFT_TIME)]),
        run("fancy", 1, [meas(B1, 100, 2.0, ids=DIFF, spec=SPEC_B1), meas(B8, 100, 1.0, spec=SPEC_B8)]),
        run("ngram", 1, [meas(B1, 100, 4.0, spec=SPEC_B1), meas(B8, 100, 2.0, spec=SPEC_B1)]),
    ]


METHODS = ["none", "ngram", "suffix_tree", "fancy"]
LOSSLESS = {"none": True, "ngram": True, "suffix_tree": True, "fancy": False}


def summary(runs=None, methods=METHODS, cells=CELLS):
    return S.summarize(runs_fixture() if runs is None else runs, methods, cells, LOSSLESS)


def parse_table(table: str) -> tuple[list[str], list[list[str]]]:
    lines = table.splitlines()
    split = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return split[0], split[2:]


def table_rows(table: str) -> dict[tuple[str, str], dict[str, str]]:
    header, body = parse_table(table)
    return {(r[1], r[2].split(" ")[0]): dict(zip(header, r)) for r in body}


# --------------------------------------------------------------------------- formatting


def test_fmt():
    assert R.fmt(None) == R.DASH and R.fmt(float("nan")) == R.DASH and R.fmt(float("inf")) == R.DASH
    assert R.fmt(1.23456, 3) == "1.235" and R.fmt(2, 1, "x") == "2.0x"
    assert R.fmt_pct(0.1234) == "12.3%" and R.fmt_pct(None) == R.DASH


def test_markdown_table_alignment():
    t = R.markdown_table(["a", "num"], [["x", "1.5"], ["long", "10.25"]], ["l", "r"])
    assert t.splitlines() == ["| a    |   num |",
                              "|------|------:|",
                              "| x    |   1.5 |",
                              "| long | 10.25 |"]
    with pytest.raises(ValueError, match="2 cells, expected 3"):
        R.markdown_table(["a", "b", "c"], [["1", "2"]])


# --------------------------------------------------------------------------- main table


def test_main_table_offline_unscored_has_no_ttft_or_task_columns():
    header, body = parse_table(R.main_table(summary()))
    assert header[:6] == ["workload", "scenario", "method", "tok/s (median)", "min–max", "speedup"]
    assert header[-1] == "identical to none"
    assert not any("TTFT" in h or "TPOT" in h or "ITL" in h for h in header)
    assert "task score" not in header
    assert len(body) == len(CELLS) * len(METHODS)
    assert all(len(r) == len(header) for r in body)


def test_main_table_cells():
    t = table_rows(R.main_table(summary()))
    none1, st1, st8 = t[(B1, "none")], t[(B1, "suffix_tree")], t[(B8, "suffix_tree")]
    assert none1["tok/s (median)"] == f"{11.25:.1f}"  # median of 10 and 12.5
    assert none1["speedup"] == "1.00x"
    assert none1["identical to none"] == "2/2"
    # batch 1: 20/10 and 40/12.5 -> 2.0 and 3.2
    assert st1["speedup"] == "2.60x (2.00–3.20)"
    assert st1["min–max"] == "20.0–40.0"
    assert st1["mean acc. len"] == f"{1 + 12 / 10:.2f}"   # pooled over the 2 repeats: 24/20
    assert st1["draft acc. rate"] == f"{100 * 24 / 160:.1f}%"
    assert st1["draft ms/step"] == "2.000"           # 2 × 0.1 s over 2 × 50 calls
    assert st1["draft % wall"] == f"{100 * 0.2 / 7.5:.1f}%"  # of 5.0 + 2.5 s wall
    assert t[(B1, "none")]["draft ms/step"] == "–"
    assert st1["identical to none"] == "4/4"
    assert st8["identical to none"] == "3/4 !"


def test_main_table_lossy_label_and_identical_cell():
    t = table_rows(R.main_table(summary()))
    fancy1 = t[(B1, "fancy")]
    assert fancy1["method"] == "fancy [LOSSY]"
    assert fancy1["identical to none"] == "2/4 (lossy)"
    assert t[(B8, "fancy")]["identical to none"] == "4/4"  # lossy but no difference: no mark
    assert "[LOSSY]" not in t[(B1, "suffix_tree")]["method"]


def test_main_table_partial_and_failed_rows():
    runs = runs_fixture() + [{"label": "eagle", "repeat": 0, "status": "failed", "error": "x"}]
    t = table_rows(R.main_table(summary(runs, METHODS + ["eagle"])))
    assert t[(B1, "ngram")]["method"] == "ngram (1/2 runs ok)"
    assert t[(B1, "ngram")]["min–max"] == R.DASH  # one ok repeat: no spread
    assert t[(B1, "ngram")]["speedup"] == "2.00x"  # 25 / 12.5, no range for one repeat
    eagle = t[(B1, "eagle")]
    assert eagle["tok/s (median)"] == "FAILED"
    assert all(v == R.DASH for k, v in eagle.items() if k not in ("workload", "scenario", "method", "tok/s (median)"))


def test_main_table_baseline_without_second_repeat_is_ref():
    runs = [run("none", 0, [meas(B1, 10, 1.0)]), run("ngram", 0, [meas(B1, 10, 0.5, spec=SPEC_B1)])]
    t = table_rows(R.main_table(S.summarize(runs, ["none", "ngram"], [("code", B1)])))
    assert t[(B1, "none")]["identical to none"] == "ref"
    assert t[(B1, "ngram")]["identical to none"] == "2/2"


def test_main_table_online_rows_add_latency_columns():
    lat = {"ttft_ms_p50": 12.34, "ttft_ms_p90": 20.0, "tpot_ms_p50": 5.56, "itl_ms_p50": 4.44, "itl_ms_p90": 9.0}
    online = {"workload": "chat", "scenario": "online c=1", "wall_s": 1.0, "output_tokens": 10,
              "texts": [["a"]], "spec": None, "drafter": None, "latency": lat}
    runs = [run("none", 0, [meas(B1, 10, 1.0, workload="chat"), online])]
    rows = S.summarize(runs, ["none"], [("chat", B1), ("chat", "online c=1")])
    header, body = parse_table(R.main_table(rows))
    for h in ("TTFT p50 ms", "TPOT p50 ms", "ITL p50 ms"):
        assert h in header
    by = {r[1]: dict(zip(header, r)) for r in body}
    assert (by["online c=1"]["TTFT p50 ms"], by["online c=1"]["TPOT p50 ms"],
            by["online c=1"]["ITL p50 ms"]) == ("12.3", "5.6", "4.4")
    assert by[B1]["TTFT p50 ms"] == R.DASH  # the offline row of the same table


def test_main_table_task_score_column_only_when_scored():
    task = {"scorer": "humaneval", "metric": "pass@1", "score": 0.75, "passed": 3, "n": 4}
    runs = [run("none", 0, [meas(B1, 10, 1.0, task=task)]), run("ngram", 0, [meas(B1, 10, 0.5)])]
    rows = S.summarize(runs, ["none", "ngram"], [("code", B1)])
    t = table_rows(R.main_table(rows))
    assert t[(B1, "none")]["task score"] == "pass@1 75.0%"
    assert t[(B1, "ngram")]["task score"] == R.DASH
    header, _ = parse_table(R.main_table(rows))
    assert header.index("task score") == len(header) - 2  # before "identical to none"


# --------------------------------------------------------------------------- acceptance table


def test_acceptance_table_pools_scenarios():
    table = R.acceptance_table(summary())
    header, body = parse_table(table)
    assert header[:3] == ["workload", "method", "mean acc. len"]
    assert header[3:] == [f"pos {i}" for i in range(1, R.TABLE_POSITIONS + 1)]
    by = {r[1]: r for r in body}
    assert set(by) == {"ngram", "suffix_tree", "fancy"}  # one row per (workload, method); none drafts nothing
    # suffix_tree: 2 repeats x (batch 1: 10 drafts, [8, 4]; batch 8: 30 drafts, [12, 6]) = 80 drafts, [40, 20]
    st = by["suffix_tree"]
    assert st[2] == f"{1 + 60 / 80:.2f}"
    assert st[3:5] == ["0.50", "0.25"]
    assert st[5:] == [R.DASH] * (R.TABLE_POSITIONS - 2)


def test_acceptance_table_without_drafts():
    rows = S.summarize([run("none", 0, [meas(B1, 10, 1.0)])], ["none"], [("code", B1)])
    assert "no speculative method produced drafts" in R.acceptance_table(rows)


def test_acceptance_table_shows_first_positions_only():
    long = spec(10, [9, 5] + [1] * 10)
    rows = S.summarize([run("ngram", 0, [meas(B1, 10, 1.0, spec=long)])], ["ngram"], [("code", B1)])
    header, (row,) = parse_table(R.acceptance_table(rows))
    assert len(header) == 3 + R.TABLE_POSITIONS
    assert row[3:] == ["0.90", "0.50"] + ["0.10"] * (R.TABLE_POSITIONS - 2)


# --------------------------------------------------------------------------- mismatches and report


def test_mismatch_lines_lossless_and_lossy():
    rows = summary()
    mm = R.mismatch_lines(rows)
    assert len(mm) == 1
    assert mm[0].startswith("suffix_tree / code / batch 8: 1 of 4 outputs differ from none")
    assert "#1@1(r1)" in mm[0]
    lossy = R.mismatch_lines(rows, lossy=True)
    assert len(lossy) == 1 and lossy[0].startswith("fancy / code / batch 1: 2 of 4 outputs differ from none")


def test_mismatch_lines_baseline_and_limit():
    many = [[i] for i in range(20)]
    other = [[i + 100] for i in range(20)]
    runs = [run("none", 0, [meas(B1, 10, 1.0, ids=many)]), run("none", 1, [meas(B1, 10, 1.0, ids=other)])]
    (line,) = R.mismatch_lines(S.summarize(runs, ["none"], [("code", B1)]), limit=3)
    assert "20 of 20 outputs differ from repeat 0 of itself" in line
    assert "#0@0(r1), #1@0(r1), #2@0(r1) … +17 more" in line


SETTINGS = {"model": "`smollm2-135m`", "scenarios": "batch 1, batch 8"}


def test_render_report_with_problems():
    rows = summary()
    report = R.render_report(SETTINGS, rows, runs_fixture(), notes=["note: 'all' leaves out 'draft_model'"],
                             env_info={"vllm": "0.32.0", "cpus": 2})
    assert report.startswith("# Speculative decoding benchmark")
    assert "- model: `smollm2-135m`" in report and "- scenarios: batch 1, batch 8" in report
    assert "- environment: vllm 0.32.0, cpus 2" in report
    assert "**LOSSY methods: fancy**" in report
    assert R.main_table(rows) in report and R.acceptance_table(rows) in report
    assert "**WARNING: greedy outputs of lossless methods differ:**" in report
    assert "- suffix_tree / code / batch 8: 1 of 4" in report
    assert "Lossy methods (differences expected):" in report
    assert "- fancy / code / batch 1: 2 of 4" in report
    assert "## Notes and problems" in report
    assert "- note: 'all' leaves out 'draft_model'" in report
    assert "- method `ngram` failed in repeat 0: worker exited with code 1: RuntimeError: boom" in report
    assert "float32" in report  # the equality note explains bf16 vs float32


def test_render_report_clean_run():
    runs = [r for r in runs_fixture() if r["label"] in ("none", "ngram") and r["status"] == "ok"]
    rows = S.summarize(runs, ["none", "ngram"], CELLS, LOSSLESS)
    report = R.render_report(SETTINGS, rows, runs)
    assert "All compared outputs of lossless methods are identical to `none`." in report
    assert "LOSSY" not in report and "WARNING" not in report
    assert "## Notes and problems" not in report


def test_budget_table_and_its_report_section():
    budget = {"rows": 10, "rows_cut": 4, "rows_emptied": 2, "proposed_tokens": 80,
              "kept_tokens": 40, "tokens_saved": 40, "verified_rows": 8,
              "accepted_tokens": 30, "price": 0.25}
    runs = [run("none", 0, [meas(B1, 100, 10.0)]),
            run("suffix_tree", 0, [meas(B1, 100, 5.0, spec=SPEC_B1,
                                        drafter=dict(DRAFTER, draft_budget=budget))]),
            run("no_budget", 0, [meas(B1, 100, 6.0, spec=SPEC_B1,
                                      drafter=dict(DRAFTER, draft_budget=dict(
                                          budget, kept_tokens=80, rows_emptied=0,
                                          enabled=False)))])]
    rows = S.summarize(runs, ["none", "suffix_tree", "no_budget"], [("code", B1)], LOSSLESS)
    header, body = parse_table(R.budget_table(rows))
    by = {r[2]: dict(zip(header, r)) for r in body}
    assert set(by) == {"suffix_tree", "no_budget"}  # none has no budget
    st = by["suffix_tree"]
    assert (st["budget"], st["proposed tokens"], st["kept (share)"], st["accepted"]) == \
        ("on", "80", "40 (50%)", "30")
    assert (st["accepted ÷ kept"], st["rows emptied"], st["price"]) == ("75%", "20%", "0.250")
    assert by["no_budget"]["budget"] == "off" and by["no_budget"]["kept (share)"] == "80 (100%)"
    report = R.render_report(SETTINGS, rows, runs)
    assert "## Draft budget per cell" in report and R.budget_table(rows) in report
    plain = [r for r in runs if r["label"] == "none"]
    assert R.budget_table(S.summarize(plain, ["none"], [("code", B1)])) is None
    assert "## Draft budget per cell" not in R.render_report(
        SETTINGS, S.summarize(plain, ["none"], [("code", B1)]), plain)


def test_render_report_without_baseline():
    runs = [run("ngram", 0, [meas(B1, 10, 1.0, spec=SPEC_B1)])]
    report = R.render_report(SETTINGS, S.summarize(runs, ["ngram"], [("code", B1)]), runs)
    assert "Not checked (`none` not run or failed)." in report


# --------------------------------------------------------------------------- plots


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plots_write_png_files_with_two_scenarios(tmp_path):
    pytest.importorskip("matplotlib")
    rows = summary()
    R.plot_speedup(rows, METHODS, ["code"], [B1, B8], tmp_path / "speedup.png")
    R.plot_acceptance(rows, METHODS, ["code"], tmp_path / "acceptance.png")
    R.plot_speedup(rows, METHODS, ["code"], [B1], tmp_path / "one.png")
    w2, h2 = png_size(tmp_path / "speedup.png")
    w1, h1 = png_size(tmp_path / "one.png")
    png_size(tmp_path / "acceptance.png")
    assert h2 > 1.5 * h1 and w2 == w1  # one panel per scenario, stacked


def test_plots_survive_failed_methods_and_no_drafts(tmp_path):
    pytest.importorskip("matplotlib")
    runs = [run("none", 0, [meas(B1, 10, 1.0)]), {"label": "ngram", "repeat": 0, "status": "failed", "error": "x"}]
    rows = S.summarize(runs, ["none", "ngram"], [("code", B1)])
    R.plot_speedup(rows, ["none", "ngram"], ["code", "chat"], [B1], tmp_path / "s.png")
    R.plot_acceptance(rows, ["none", "ngram"], ["code", "chat"], tmp_path / "a.png")
    png_size(tmp_path / "s.png")
    # five workloads wrap onto two rows of at most three panels
    R.plot_acceptance(rows, ["none", "ngram"], ["code", "chat", "math", "sharegpt", "repetitive"],
                      tmp_path / "a5.png")
    R.plot_acceptance(rows, ["none", "ngram"], ["code", "chat", "math"], tmp_path / "a3.png")
    w5, h5 = png_size(tmp_path / "a5.png")
    w3, h3 = png_size(tmp_path / "a3.png")
    assert w5 == w3 and h5 > 1.5 * h3
    png_size(tmp_path / "a.png")


def test_speedup_pivot_one_line_per_cell_one_column_per_method():
    rows = summary()
    header, body = parse_table(R.speedup_pivot(rows))
    assert header == ["workload", "scenario", "ngram", "suffix_tree", "fancy"]
    by = {(r[0], r[1]): dict(zip(header, r)) for r in body}
    assert set(by) == {("code", B1), ("code", B8)}
    # suffix_tree batch 1: 100/5 vs 100/10 and 100/2.5 vs 100/8 -> median of 2.0 and 3.2
    assert by[("code", B1)]["suffix_tree"].startswith("2.60x (τ ")
    assert by[("code", B1)]["ngram"].startswith("2.00x")  # only repeat 1 ran: 25 / 12.5
    assert R.speedup_pivot([r for r in rows if r["method"] == "none"]) == "_(no speculative method)_"


def test_latency_plot_only_for_online_runs(tmp_path):
    pytest.importorskip("matplotlib")

    def online(scenario, ttft, tpot):
        lat = {"ttft_ms_p50": ttft, "ttft_ms_p90": ttft, "tpot_ms_p50": tpot, "itl_ms_p50": tpot,
               "itl_ms_p90": tpot}
        return {"workload": "chat", "scenario": scenario, "wall_s": 1.0, "output_tokens": 10,
                "texts": [["a"]], "spec": None, "drafter": None, "latency": lat}

    cells = [("chat", "online c=1"), ("chat", "online c=4")]
    runs = [run("none", 0, [online("online c=1", 50.0, 20.0), online("online c=4", 80.0, 30.0)]),
            run("ngram", 0, [online("online c=1", 55.0, 12.0), online("online c=4", 90.0, 25.0)])]
    rows = S.summarize(runs, ["none", "ngram"], cells)
    assert R.plot_latency(rows, ["none", "ngram"], ["chat"], ["online c=1", "online c=4"], tmp_path / "l.png")
    w2, h2 = png_size(tmp_path / "l.png")
    assert R.plot_latency(rows, ["none", "ngram"], ["chat"], ["online c=1"], tmp_path / "l1.png")
    w1, h1 = png_size(tmp_path / "l1.png")
    assert w2 > 1.5 * w1 and h2 == h1  # one column per concurrency level
    # offline-only rows: nothing to draw, no file
    assert not R.plot_latency(summary(), METHODS, ["code"], [B1, B8], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_speedup_pivot_lossy_method_shows_its_task_score_next_to_the_baseline():
    def task(score):
        return {"scorer": "humaneval", "metric": "pass@1", "score": score, "passed": 0, "n": 2}

    runs = [run("none", 0, [meas(B1, 10, 1.0, task=task(0.5))]),
            run("ngram", 0, [meas(B1, 10, 0.5, spec=SPEC_B1, task=task(0.5))]),
            run("fancy", 0, [meas(B1, 10, 0.25, spec=SPEC_B1, task=task(0.25))])]
    rows = S.summarize(runs, ["none", "ngram", "fancy"], [("code", B1)], lossless={"fancy": False})
    header, body = parse_table(R.speedup_pivot(rows))
    cell = dict(zip(header, body[0]))
    assert cell["fancy"].startswith("4.00x") and cell["fancy"].endswith("[pass@1 25% vs 50%]")
    assert "[" not in cell["ngram"]  # lossless: the score is the baseline's, not repeated here
