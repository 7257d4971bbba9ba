"""train-judge: its data stays off the benchmark sets, labels splice right,
the head fits, and a rerun resumes from the work files."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from vllm_spec_plugins.judge_training import (
    MATH_SEED,
    JudgeTrainSettings,
    fit_head,
    judge_tasks,
    splice,
)


def test_training_tasks_are_disjoint_from_the_quality_sets():
    from vllm_spec_plugins.bench.workloads import humaneval_task_number, load_math, load_workload

    tasks = judge_tasks(82, 30)
    code = [t for t in tasks if t["kind"] == "code"]
    assert len(code) == 82
    assert all(humaneval_task_number(t["reference"]["task_id"]) % 2 == 1 for t in code)
    even = {r["task_id"] for r in load_workload("code_even", None, 0).references}
    assert len(even) == 82 and not even & {t["reference"]["task_id"] for t in code}
    bench_math = {json.dumps(p) for p in load_math(200, 0).prompts}
    maths = [t for t in tasks if t["kind"] == "math"]
    assert len(maths) == 30 and not any(json.dumps(t["messages"]) in bench_math for t in maths)
    assert MATH_SEED != 0


def test_splice_falls_back_into_the_original():
    orig = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    # swap 9 in at position 2; the continuation writes 11 then rejoins at 5 6 7 8
    assert splice(orig, 2, 9, [11, 5, 6, 7, 8, 42], eos={0}, align=4) == \
        [1, 2, 9, 11, 5, 6, 7, 8, 9, 10]
    # never rejoins and does not end: no label from it
    assert splice(orig, 2, 9, [20, 21, 22, 23, 24], eos={0}, align=4) is None
    # ends (EOS) on its own: the continuation is the answer
    assert splice(orig, 2, 9, [20, 0], eos={0}, align=4) == [1, 2, 9, 20, 0]


def test_fit_head_separates_and_picks_a_threshold():
    rng = np.random.default_rng(0)
    n, f = 400, 12
    X = rng.normal(size=(n, f)).astype(np.float32)
    y = (X[:, 0] + 0.3 * rng.normal(size=n) > 0).astype(np.float32)
    groups = np.arange(n) // 10
    fit = fit_head(X, y, groups, JudgeTrainSettings(max_false_accept=0.1), log=lambda *_: None)
    rep = fit["report"]
    assert rep["heldout_auc"] > 0.9
    assert rep["heldout_false_accept"] <= 0.1 + 1e-9
    assert 0.5 <= fit["threshold"] < 1.0
    with pytest.raises(RuntimeError, match="same"):
        fit_head(X, np.ones(n, np.float32), groups, JudgeTrainSettings(), log=lambda *_: None)


@pytest.mark.engine
def test_train_judge_makes_a_head_and_resumes(smoke_judge):
    from conftest import smoke_judge_command
    from vllm_spec_plugins.scorers.judge import load_head

    head = load_head(smoke_judge)
    assert head.target.name == "smollm2-135m" and head.target.hidden_size == 576
    t = head.training
    assert t["math_seed"] == MATH_SEED and t["examples"] > 0
    assert 0 < t["acceptable"] < t["examples"]
    # a rerun reuses every phase's work files (no engine, no features again)
    r = subprocess.run(smoke_judge_command(smoke_judge), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "answers: reused" in r.stdout and "candidates: reused" in r.stdout
    assert "labelled" not in r.stdout
