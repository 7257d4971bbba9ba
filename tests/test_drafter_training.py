"""``train-drafter``: its data is disjoint from the benchmark sets, a trained
drafter accepts more than an untrained one on held-out answers, and a run
resumes from its checkpoint. Uses the session's smoke drafter (trained by the
real command on the default model) and its corpus."""

from __future__ import annotations

import json

import pytest

from vllm_spec_plugins import drafter_data

pytestmark = pytest.mark.engine  # the smoke drafter's corpus is written by vLLM


def test_training_prompts_are_disjoint_from_the_benchmark_sets():
    prompts = drafter_data.training_prompts(600, seed=0)
    assert len(prompts) == 600 and len(set(prompts)) > 550
    bench = drafter_data.benchmark_prompt_texts()
    assert len(bench) > 100, "HumanEval and MT-Bench should be installed for this check"
    assert not bench & {p.strip() for p in prompts}
    # the math prompts never come from the benchmark's generator
    assert drafter_data.BENCHMARK_MATH_DATASET not in drafter_data.MATH_DATASETS
    # and no HumanEval task's function is asked for
    from vllm_spec_plugins.bench.workloads import load_humaneval

    names = set()
    for meta in load_humaneval(None, 0).meta:
        names.add(meta.get("entry_point") or "")
    names.discard("")
    code = " ".join(drafter_data.code_prompts(2000, 0))
    assert not [n for n in names if f"def {n}(" in code]


def test_trained_drafter_accepts_more_than_untrained_on_held_out_answers(smoke_drafter):
    from vllm_spec_plugins.drafter_training import TrainSettings, evaluate_untrained

    record = json.loads((smoke_drafter / "drafter.json").read_text())["training"]
    trained = record["heldout"]
    assert record["steps"] == 80 and record["corpus"]["removed_as_benchmark"] == 0
    untrained = evaluate_untrained(TrainSettings(target="smollm2-135m", out=str(smoke_drafter),
                                                 block_size=10))
    assert trained["acceptance_length_argmax"] > untrained["acceptance_length_argmax"] + 0.05, \
        (trained, untrained)
    assert trained["reached_per_position"][0] > untrained["reached_per_position"][0]


def test_a_second_run_resumes_from_the_checkpoint(smoke_drafter, tmp_path):
    import shutil

    from vllm_spec_plugins.drafter_training import TrainSettings, train

    out = tmp_path / "resumed"
    out.mkdir()
    for f in ("corpus.npz", "checkpoint.pt"):
        shutil.copy(smoke_drafter / f, out / f)
    lines = []
    record = train(TrainSettings(target="smollm2-135m", out=str(out), max_steps=83,
                                 minutes=20, progress=False), log=lines.append)
    assert any("resumed at step 80" in line for line in lines), lines
    assert record["steps"] == 83
    # a budget already spent trains no further
    lines.clear()
    record = train(TrainSettings(target="smollm2-135m", out=str(out), minutes=1e-4,
                                 progress=False), log=lines.append)
    assert record["steps"] == 83
