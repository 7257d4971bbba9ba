"""Benchmark runner: argument errors, metric math, aggregation, report formatting.

Pure functions only -- no engine, no model, no subprocess."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from vllm_spec_plugins.bench import runner as R
from vllm_spec_plugins.bench.runner import MethodSpec

KNOWN_PLUGINS = ["suffix_tree"]
KNOWN_WORKLOADS = ["chat", "code", "repetitive"]


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    R.add_arguments(p)
    return p.parse_args(argv)


def config(argv: list[str]) -> R.BenchConfig:
    return R.config_from_args(parse(argv), KNOWN_PLUGINS, KNOWN_WORKLOADS)


# --------------------------------------------------------------------------- arguments


def test_defaults():
    cfg = config([])
    assert cfg.model == "smollm2-135m"
    assert [m.label for m in cfg.methods] == ["none", "ngram", "suffix", "suffix_tree"]
    assert cfg.workloads == ["repetitive", "code", "chat"]
    assert (cfg.num_prompts, cfg.max_tokens, cfg.k, cfg.batch_size, cfg.repeats) == (16, 256, 8, None, 1)
    assert cfg.dtype == "bfloat16"
    assert cfg.out == "bench_results"
    assert cfg.kv_cache_bytes == 2 << 30
    assert cfg.plugin_config == {}


def test_parse_methods_kinds():
    specs = R.parse_methods("none, ngram,suffix,suffix_tree,plugin:suffix_tree,plugin:pkg.mod:Cls",
                            KNOWN_PLUGINS)
    assert specs == [
        MethodSpec("none", "none"),
        MethodSpec("ngram", "ngram"),
        MethodSpec("suffix", "suffix"),
        MethodSpec("suffix_tree", "plugin", "suffix_tree"),
        MethodSpec("plugin:suffix_tree", "plugin", "suffix_tree"),
        MethodSpec("plugin:pkg.mod:Cls", "plugin", "pkg.mod:Cls"),
    ]


@pytest.mark.parametrize("text, fragment", [
    ("none,eagle", "unknown method 'eagle'"),
    ("plugin:nope", "unknown plugin method 'nope'"),
    ("plugin:", "names no plugin method"),
    ("none,none", "listed more than once: none"),
    (" , ", "empty list"),
])
def test_parse_methods_errors(text, fragment):
    with pytest.raises(ValueError, match="--methods") as e:
        R.parse_methods(text, KNOWN_PLUGINS)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_parse_workloads(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    assert R.parse_workloads(f"code,{f}", KNOWN_WORKLOADS) == ["code", str(f)]
    with pytest.raises(ValueError, match="unknown workload 'math'.*chat, code, repetitive"):
        R.parse_workloads("code,math", KNOWN_WORKLOADS)
    with pytest.raises(ValueError, match="no such file"):
        R.parse_workloads(str(tmp_path / "missing.jsonl"), KNOWN_WORKLOADS)
    with pytest.raises(ValueError, match="more than once"):
        R.parse_workloads("code,code", KNOWN_WORKLOADS)


def test_parse_workloads_uses_registry_by_default():
    assert R.parse_workloads("repetitive") == ["repetitive"]
    assert R.parse_methods("suffix_tree")[0].plugin_method == "suffix_tree"


@pytest.mark.parametrize("argv, fragment", [
    (["--num-prompts", "0"], "--num-prompts must be > 0"),
    (["--max-tokens", "-1"], "--max-tokens must be > 0"),
    (["--max-tokens", "5000"], "max_model_len"),
    (["--k", "0"], "--k must be > 0"),
    (["--batch-size", "0"], "--batch-size must be > 0"),
    (["--repeats", "0"], "--repeats must be > 0"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
    (["--dtype", "int8"], "--dtype"),
    (["--plugin-config", "{bad"], "invalid JSON"),
    (["--plugin-config", "[1, 2]"], "expected a JSON object"),
    (["--plugin-config", '{"method": "x"}'], "'method' is chosen with --methods"),
])
def test_argument_errors(argv, fragment):
    with pytest.raises(ValueError) as e:
        config(argv)
    assert fragment in str(e.value)


def test_plugin_config_and_batch_size():
    cfg = config(["--plugin-config", '{"max_tree_depth": 32}', "--batch-size", "1", "--kv-cache-gb", "0.5"])
    assert cfg.plugin_config == {"max_tree_depth": 32}
    assert cfg.batch_size == 1
    assert cfg.kv_cache_bytes == 1 << 29


def test_filter_available_skips_suffix_without_arctic():
    specs = R.parse_methods("none,suffix,suffix_tree", KNOWN_PLUGINS)
    kept, warnings = R.filter_available(specs, has_arctic=False)
    assert [m.label for m in kept] == ["none", "suffix_tree"]
    assert len(warnings) == 1 and "arctic_inference" in warnings[0] and "'suffix'" in warnings[0]
    kept, warnings = R.filter_available(specs, has_arctic=True)
    assert len(kept) == 3 and warnings == []


def test_model_errors(tmp_path):
    with pytest.raises(ValueError, match="neither a known model"):
        R.resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="without config.json"):
        R.resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert R.resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())


def test_engine_kwargs():
    common = dict(model="/m", dtype="bfloat16", seed=3, k=6, kv_cache_bytes=1 << 30)
    none = R.engine_kwargs(MethodSpec("none", "none"), **common)
    assert none == {"model": "/m", "dtype": "bfloat16", "kv_cache_memory_bytes": 1 << 30,
                    "max_model_len": 4096, "disable_log_stats": False, "seed": 3}
    ngram = R.engine_kwargs(MethodSpec("ngram", "ngram"), **common)["speculative_config"]
    assert ngram == {"method": "ngram", "num_speculative_tokens": 6,
                     "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    suffix = R.engine_kwargs(MethodSpec("suffix", "suffix"), **common)["speculative_config"]
    assert suffix == {"method": "suffix", "num_speculative_tokens": 6}
    plug = R.engine_kwargs(MethodSpec("suffix_tree", "plugin", "suffix_tree"),
                           plugin_config={"max_tree_depth": 32}, **common)
    assert plug["speculative_config"]["method"] == "custom_class"
    assert plug["speculative_config"]["model"] == "vllm_spec_plugins.integration.PluginDrafter"
    assert plug["speculative_config"]["num_speculative_tokens"] == 6
    assert plug["additional_config"] == {"spec_plugins": {"method": "suffix_tree", "max_tree_depth": 32}}


def test_rotated_order_and_schedule():
    assert R.rotated_order("abc", 0) == ["a", "b", "c"]
    assert R.rotated_order("abc", 1) == ["b", "c", "a"]
    assert R.rotated_order("abc", 4) == ["b", "c", "a"]
    assert R.rotated_order([], 3) == []
    sched = R.run_schedule(["a", "b"], 3)
    assert sched == [(0, "a"), (0, "b"), (1, "b"), (1, "a"), (2, "a"), (2, "b")]
    # every method runs once per repeat, and each method leads in some repeat
    firsts = {sched[i][1] for i in range(0, len(sched), 2)}
    assert firsts == {"a", "b"}


# --------------------------------------------------------------------------- metric math


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


def test_spec_counters_sums_label_sets_and_ignores_others():
    metrics = [
        _Counter(R.M_DRAFTS, 10, {"engine": "0"}),
        _Counter(R.M_DRAFTS, 5, {"engine": "1"}),
        _Counter(R.M_DRAFT_TOKENS, 60, {}),
        _Counter(R.M_ACCEPTED, 30, {}),
        _Counter("vllm:prompt_tokens", 999, {}),
        _Vector(R.M_ACCEPTED_PER_POS, [9, 6, 3], {"engine": "0"}),
        _Vector(R.M_ACCEPTED_PER_POS, [1, 1, 1, 1], {"engine": "1"}),
    ]
    c = R.spec_counters(metrics)
    assert c == {"drafts": 15, "draft_tokens": 60, "accepted": 30, "accepted_per_pos": [10, 7, 4, 1]}
    assert R.spec_counters([]) == {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}


def test_counters_delta_and_sum():
    before = {"drafts": 2, "draft_tokens": 16, "accepted": 5, "accepted_per_pos": []}
    after = {"drafts": 12, "draft_tokens": 96, "accepted": 35, "accepted_per_pos": [9, 8, 7]}
    d = R.counters_delta(before, after)
    assert d == {"drafts": 10, "draft_tokens": 80, "accepted": 30, "accepted_per_pos": [9, 8, 7]}
    d2 = R.counters_delta({**after, "accepted_per_pos": [4, 4, 4]}, {**after, "accepted_per_pos": [5, 6, 7]})
    assert d2["accepted_per_pos"] == [1, 2, 3] and d2["drafts"] == 0
    s = R.sum_counters([d, {"drafts": 1, "draft_tokens": 8, "accepted": 1, "accepted_per_pos": [1, 0, 0, 0]}, {}])
    assert s == {"drafts": 11, "draft_tokens": 88, "accepted": 31, "accepted_per_pos": [10, 8, 7, 0]}


def test_acceptance_math():
    assert R.mean_acceptance_length(10, 25) == pytest.approx(3.5)
    assert R.mean_acceptance_length(0, 0) is None
    assert R.acceptance_per_position([8, 4, 2], 10) == pytest.approx([0.8, 0.4, 0.2])
    assert R.acceptance_per_position([8], 0) == []
    assert R.draft_acceptance_rate(80, 20) == pytest.approx(0.25)
    assert R.draft_acceptance_rate(0, 0) is None
    assert R.proposer_ms_per_step(0.5, 1000) == pytest.approx(0.5)
    assert R.proposer_ms_per_step(1.0, 0) is None


def test_drafter_delta():
    a = {"method": "suffix_tree", "steps": 10, "rows": 20, "drafted_tokens": 50,
         "propose_seconds": 0.25, "errors": 0, "tracked_requests": 3}
    b = dict(a, steps=30, rows=70, drafted_tokens=150, propose_seconds=1.0)
    assert R.drafter_delta(a, b) == {"steps": 20, "rows": 50, "drafted_tokens": 100,
                                     "propose_seconds": pytest.approx(0.75), "errors": 0}
    assert R.drafter_delta(None, b) is None


def test_median_spread():
    assert R.median_spread([3.0, 1.0, 2.0]) == (2.0, 1.0, 3.0)
    assert R.median_spread([1.0, 4.0]) == (2.5, 1.0, 4.0)
    assert R.median_spread([None, 5.0]) == (5.0, 5.0, 5.0)
    assert R.median_spread([]) == (None, None, None)


def test_compare_outputs():
    ref = [[1, 2, 3], [4, 5], [6], []]
    assert R.compare_outputs(ref, [[1, 2, 3], [4, 5], [6], []]) == []
    assert R.compare_outputs(ref, [[1, 9, 3], [4, 5, 7], [6], [1]]) == [(0, 1), (1, 2), (3, 0)]
    assert R.first_difference([1, 2], [1]) == 1
    with pytest.raises(ValueError, match="output counts differ"):
        R.compare_outputs(ref, ref[:2])


# --------------------------------------------------------------------------- aggregation


def _run(label, repeat, workloads, status="ok"):
    return {"label": label, "repeat": repeat, "status": status, "workloads": workloads}


def _w(tokens, wall, ids, spec=None, drafter=None):
    return {"output_tokens": tokens, "wall_s": wall, "token_ids": ids, "spec": spec, "drafter": drafter}


SPEC = {"drafts": 10, "draft_tokens": 80, "accepted": 40, "accepted_per_pos": [9, 8, 7, 6, 4, 3, 2, 1]}


def _runs():
    ids = [[1, 2, 3], [4, 5, 6]]
    return [
        _run("none", 0, {"code": _w(100, 10.0, ids)}),
        _run("suffix_tree", 0, {"code": _w(100, 5.0, ids, SPEC,
                                           {"steps": 50, "propose_seconds": 0.05})}),
        _run("suffix_tree", 1, {"code": _w(100, 4.0, [[1, 2, 3], [4, 7, 6]], SPEC,
                                           {"steps": 50, "propose_seconds": 0.05})}),
        _run("none", 1, {"code": _w(100, 8.0, ids)}),
        {"label": "ngram", "repeat": 0, "status": "failed", "error": "worker exited with code 1: Boom"},
        _run("ngram", 1, {"code": _w(100, 5.0, ids, SPEC)}),
    ]


def test_summarize_paired_speedup_and_equality():
    rows = R.summarize(_runs(), ["none", "ngram", "suffix_tree"], ["code"])
    by = {r["method"]: r for r in rows}
    none, st, ng = by["none"], by["suffix_tree"], by["ngram"]
    assert none["tokens_per_s"] == pytest.approx(11.25)  # median of 10, 12.5
    assert none["speedup"] == pytest.approx(1.0)
    assert none["identical"] == 2 and none["compared"] == 2  # repeat 1 vs repeat 0
    # speedups paired per repeat: 20/10 = 2.0 and 25/12.5 = 2.0
    assert st["speedup_all"] == pytest.approx([2.0, 2.0])
    assert st["tokens_per_s"] == pytest.approx(22.5)
    assert (st["tokens_per_s_min"], st["tokens_per_s_max"]) == pytest.approx((20.0, 25.0))
    assert st["identical"] == 3 and st["compared"] == 4
    assert st["mismatches"] == [{"repeat": 1, "prompt": 1, "position": 1}]
    assert st["mean_acceptance_length"] == pytest.approx(1 + 80 / 20)
    assert st["acceptance_per_position"][0] == pytest.approx(18 / 20)
    assert st["proposer_ms_per_step"] == pytest.approx(1.0)  # 0.1 s / 100 steps
    assert st["proposer_share"] == pytest.approx(0.1 / 9.0)
    # ngram: one failed repeat, one ok -> still ok, flagged in the table
    assert ng["status"] == "ok" and ng["repeats_ok"] == 1 and ng["repeats_total"] == 2
    assert ng["speedup"] == pytest.approx(20.0 / 12.5)
    assert ng["proposer_ms_per_step"] is None


def test_summarize_failed_method_and_missing_baseline():
    runs = [_run("suffix_tree", 0, {"code": _w(10, 1.0, [[1]], SPEC)}),
            {"label": "ngram", "repeat": 0, "status": "failed", "error": "x"}]
    rows = R.summarize(runs, ["ngram", "suffix_tree"], ["code"])
    by = {r["method"]: r for r in rows}
    assert by["ngram"]["status"] == "failed" and by["ngram"]["tokens_per_s"] is None
    assert by["suffix_tree"]["speedup"] is None and by["suffix_tree"]["identical"] is None


# --------------------------------------------------------------------------- report


def test_markdown_table_alignment():
    t = R.markdown_table(["a", "num"], [["x", "1.5"], ["long", "10.25"]], ["l", "r"])
    lines = t.splitlines()
    assert lines[0] == "| a    |   num |"
    assert lines[1] == "|------|------:|"
    assert lines[2] == "| x    |   1.5 |"
    assert lines[3] == "| long | 10.25 |"
    assert len({len(x) for x in lines}) == 1
    with pytest.raises(ValueError, match="2 cells, expected 3"):
        R.markdown_table(["a", "b", "c"], [["1", "2"]])


def test_fmt():
    assert R.fmt(None) == R.DASH
    assert R.fmt(float("nan")) == R.DASH
    assert R.fmt(1.23456, 3) == "1.235"
    assert R.fmt_pct(0.1234) == "12.3%"
    assert R.fmt_pct(None) == R.DASH


def test_main_table_cells():
    rows = R.summarize(_runs(), ["none", "ngram", "suffix_tree"], ["code"])
    table = R.main_table(rows)
    lines = table.splitlines()
    assert len(lines) == 2 + 3
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["workload", "method", "tok/s (median)", "min–max", "speedup"]
    assert header[-1] == "identical to none"
    cells = {c[1]: c for c in ([x.strip() for x in ln.strip("|").split("|")] for ln in lines[2:])}
    none = cells["none"]
    assert none[2] == f"{11.25:.1f}"
    assert none[4] == "1.00x" and none[-1] == "2/2"
    st = cells["suffix_tree"]
    assert st[2] == "22.5" and st[3] == "20.0–25.0"
    assert st[4] == "2.00x (2.00–2.00)"
    assert st[5] == "5.00" and st[6] == "50.0%"  # 80 of 160 drafted
    assert st[7] == "1.000" and st[8] == "1.1%"
    assert st[-1] == "3/4 !"
    assert "ngram (1/2 runs ok)" in cells


def test_main_table_failed_and_ref_rows():
    runs = [_run("none", 0, {"code": _w(10, 1.0, [[1]])}),
            {"label": "ngram", "repeat": 0, "status": "failed", "error": "x"}]
    rows = R.summarize(runs, ["none", "ngram"], ["code"])
    lines = R.main_table(rows).splitlines()
    none = [x.strip() for x in lines[2].strip("|").split("|")]
    ngram = [x.strip() for x in lines[3].strip("|").split("|")]
    assert none[-1] == "ref"
    assert ngram[2] == "FAILED" and all(c == R.DASH for c in ngram[3:])


def test_acceptance_table_first_eight_positions():
    row = {"workload": "code", "method": "suffix_tree", "status": "ok",
           "acceptance_per_position": [0.9, 0.5] + [0.1] * 10}
    lines = R.acceptance_table([row]).splitlines()
    assert lines[0].count("pos ") == 8
    cells = [x.strip() for x in lines[2].strip("|").split("|")]
    assert cells == ["code", "suffix_tree", "0.90", "0.50"] + ["0.10"] * 6
    short = dict(row, acceptance_per_position=[0.5])
    cells = [x.strip() for x in R.acceptance_table([short]).splitlines()[2].strip("|").split("|")]
    assert cells[2:] == ["0.50"] + [R.DASH] * 7
    assert "no speculative method" in R.acceptance_table([dict(row, acceptance_per_position=[])])


def test_mismatch_lines_and_report():
    runs = _runs()
    rows = R.summarize(runs, ["none", "ngram", "suffix_tree"], ["code"])
    mm = R.mismatch_lines(rows)
    assert len(mm) == 1
    assert mm[0].startswith("suffix_tree / code: 1 of 4 outputs differ from none")
    assert "#1@tok1(r1)" in mm[0]
    cfg = config(["--methods", "none,ngram,suffix_tree", "--workloads", "code", "--repeats", "2"])
    report = R.render_report(cfg, rows, runs, skipped=["warning: skipping method 'suffix'"])
    assert report.startswith("# Speculative decoding benchmark")
    assert "WARNING: greedy outputs differ" in report
    assert "float32" in report and "bfloat16" in report
    assert "method `ngram` failed in repeat 0: worker exited with code 1: Boom" in report
    assert "skipping method 'suffix'" in report
    # all rows JSON-serialisable (results.json)
    json.dumps(rows)


def test_last_error_line():
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
          "    boom()", "pydantic_core.ValidationError: 1 validation error for ModelConfig",
          "  Value error, Unrecognized model", "", "some trailing log line"]
    assert R.last_error_line(tb) == "pydantic_core.ValidationError: 1 validation error for ModelConfig"
    assert R.last_error_line(["a", "last words", "  "]) == "last words"
    assert R.last_error_line([]) == ""


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    rows = R.summarize(_runs(), ["none", "ngram", "suffix_tree"], ["code"])
    R.plot_speedup(rows, ["none", "ngram", "suffix_tree"], ["code"], tmp_path / "s.png")
    R.plot_acceptance(rows, ["none", "ngram", "suffix_tree"], ["code"], tmp_path / "a.png")
    for name in ("s.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_from_args_with_fake_workers(tmp_path, monkeypatch, capsys):
    """Orchestration without an engine: the worker subprocess is replaced by a fake."""
    pytest.importorskip("matplotlib")
    calls = []

    def fake_worker(spec, run_dir, timeout):
        label, repeat = spec["method"]["label"], spec["repeat"]
        calls.append((repeat, label))
        if label == "ngram":
            return {"label": label, "repeat": repeat, "status": "failed",
                    "error": "worker exited with code 1: RuntimeError: boom",
                    "stderr_tail": ["Traceback ...", "RuntimeError: boom"], "stderr_log": "x.log"}
        wl = {}
        for w in spec["workloads"]:
            n = len(w["prompts"])
            ids = [[7, 8, 9] for _ in range(n)]
            if label == "suffix_tree":
                ids[0] = [7, 0, 9]
            spec_c = None if label == "none" else SPEC
            drafter = {"steps": 10, "propose_seconds": 0.01} if label == "suffix_tree" else None
            wl[w["name"]] = _w(3 * n, 1.0 if label == "none" else 0.5, ids, spec_c, drafter)
        return {"label": label, "repeat": repeat, "status": "ok", "workloads": wl}

    monkeypatch.setattr(R, "_run_worker", fake_worker)
    monkeypatch.setattr(R, "resolve_model_path", lambda name: "/fake/model")
    out = tmp_path / "out"
    args = parse(["--methods", "none,ngram,suffix_tree", "--workloads", "repetitive",
                  "--num-prompts", "2", "--repeats", "2", "--out", str(out)])
    assert R.run_from_args(args) == 1  # one method failed
    assert calls == [(0, "none"), (0, "ngram"), (0, "suffix_tree"),
                     (1, "ngram"), (1, "suffix_tree"), (1, "none")]
    captured = capsys.readouterr()
    assert "| repetitive | suffix_tree" in captured.out
    assert "FAILED" in captured.out
    assert "error: method 'ngram' failed (repeat 0)" in captured.err
    assert "RuntimeError: boom" in captured.err
    assert "WARNING: greedy outputs differ from 'none'" in captured.err
    assert "suffix_tree / repetitive: 2 of 4 outputs differ" in captured.err
    for name in ("results.md", "results.json", "speedup.png", "acceptance.png"):
        assert (out / name).is_file()
    data = json.loads((out / "results.json").read_text())
    st = [r for r in data["summary"] if r["method"] == "suffix_tree"][0]
    assert st["speedup"] == pytest.approx(2.0)
    assert len(data["runs"]) == 6
