"""Scoring benchmark answers: is the speculative output still *right*?

A workload with a ``scorer`` (see :mod:`vllm_spec_plugins.bench.workloads`)
carries per-prompt ``references``; :func:`score` grades the model's replies
against them:

* ``humaneval``   -- pass@1: the Python code of each reply is run against the
  HumanEval reference tests in a separate, resource-limited interpreter
  (:func:`run_python`); a reply passes iff the program exits with status 0.
* ``exact_match`` -- the final answer of each reply (the last ``Answer: ...``
  line, else the last ``\\boxed{...}``, else the last number) equals the
  reference, numerically when both are numbers.

Plain Python, no vLLM imports.

Running model-written code is not sandboxed beyond a temporary working
directory, resource limits and a timeout: run benchmarks on a machine where
that is acceptable.
"""

from __future__ import annotations

import ast
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional

__all__ = [
    "SCORERS",
    "METRICS",
    "score",
    "ExecResult",
    "run_python",
    "extract_code",
    "humaneval_program",
    "check_humaneval",
    "score_humaneval",
    "extract_answer",
    "answers_match",
    "score_exact_match",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_TIMEOUT_S = 10.0
_MEMORY_LIMIT = 1 << 30  # address space of a test program (bytes)
_OUTPUT_LIMIT = 16 << 20  # bytes a test program may write to stdout/stderr files
_WORKERS = 2


# --------------------------------------------------------------------------- execution


@dataclass
class ExecResult:
    passed: bool  # exit status 0 within the time limit
    returncode: Optional[int]  # None when killed for the timeout
    timed_out: bool
    stdout: str  # tails, for diagnostics
    stderr: str


# Runs in the child before the candidate code: set the limits there rather than
# in a ``preexec_fn``, which is unsafe with threads (we run a thread pool) and
# so could deadlock the fork. Soft = hard, so the code cannot raise them again.
# ``run_name`` other than "__main__": demo code under ``if __name__ ==
# "__main__":`` in a reply is not run (it is not what is graded).
_BOOTSTRAP = """\
import resource, runpy, sys
for _name, _value in {limits!r}:
    try:
        resource.setrlimit(getattr(resource, _name), (_value, _value))
    except (AttributeError, ValueError, OSError):
        pass  # limit not available on this platform
runpy.run_path(sys.argv[1], run_name="__candidate__")
"""


def _tail(path: str, limit: int = 2000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_python(program: str, timeout: float = DEFAULT_TIMEOUT_S) -> ExecResult:
    """Run ``program`` in a fresh ``python -I`` (``sys.executable``) whose working
    directory is a new temporary directory, with limits on address space
    (1 GiB), CPU time (about ``timeout``), output file size and core dumps,
    stdin closed, and the whole process group killed after ``timeout`` seconds."""
    limits = [
        ("RLIMIT_AS", _MEMORY_LIMIT),
        ("RLIMIT_CPU", int(math.ceil(timeout)) + 1),
        ("RLIMIT_FSIZE", _OUTPUT_LIMIT),
        ("RLIMIT_CORE", 0),
    ]
    with tempfile.TemporaryDirectory(prefix="vsp-exec-") as tmp:
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w", encoding="utf-8") as fh:
            fh.write(program)
        out_path, err_path = os.path.join(tmp, "stdout.txt"), os.path.join(tmp, "stderr.txt")
        # Output goes to files, not pipes: RLIMIT_FSIZE then bounds it, and a
        # chatty program cannot fill our memory.
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _BOOTSTRAP.format(limits=limits), prog],
                cwd=tmp, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                start_new_session=True,  # its own process group: children die with it
            )
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                try:
                    os.killpg(proc.pid, 9)  # also anything it forked
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        rc = None if timed_out else proc.returncode
        return ExecResult(rc == 0, rc, timed_out, _tail(out_path), _tail(err_path))


# --------------------------------------------------------------------------- HumanEval

_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_PY_LANGS = {"python", "python3", "py", "py3"}
_CODE_START = re.compile(r"^(?:import |from \S+ import |def |async def |class |@)")


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return True


def _defines(code: str, entry_point: str) -> bool:
    return re.search(rf"^[ \t]*(?:async[ \t]+)?def[ \t]+{re.escape(entry_point)}[ \t]*\(", code, re.M) is not None


def _as_body(code: str, prompt: str) -> Optional[str]:
    """``prompt`` completed with ``code`` as the function body, if that parses."""
    if not code.strip():
        return None
    lines = code.strip("\n").splitlines()
    first = next(line for line in lines if line.strip())
    if first == first.lstrip():  # a dedented body: indent it under the def
        code = textwrap.indent(code.strip("\n"), "    ")
    program = prompt.rstrip("\n") + "\n" + code.rstrip() + "\n"
    return program if _parses(program) else None


def _unfenced_code(reply: str, entry_point: str) -> Optional[str]:
    """The code part of a reply without code fences: from the first line that
    starts a top-level statement up to where it stops parsing (prose after it)."""
    lines = reply.splitlines()
    start = next((i for i, line in enumerate(lines) if _CODE_START.match(line)), None)
    if start is None:
        return None
    for end in range(len(lines), start, -1):
        code = "\n".join(lines[start:end]).rstrip() + "\n"
        if _defines(code, entry_point) and _parses(code):
            return code
    return None


def extract_code(reply: str, entry_point: str, prompt: str) -> Optional[str]:
    """The Python code of a chat reply to a HumanEval problem, as a program that
    defines ``entry_point``; None when the reply has no usable code.

    * A fenced code block is preferred (a ``python`` one over an unlabeled one,
      one defining ``entry_point`` over others; an unclosed block -- the reply
      hit its token limit -- runs to the end of the reply).
    * Code that defines ``def <entry_point>`` is used as is.
    * Code that is only the function body is appended to ``prompt``.
    """
    blocks = [(lang.lower(), code) for lang, code in _FENCE.findall(reply)]
    candidates = [c for lang, c in blocks if lang in _PY_LANGS] or [c for lang, c in blocks if not lang]
    if candidates:
        full = [c for c in candidates if _defines(c, entry_point)]
        if full:
            return full[0]
        return _as_body(candidates[0], prompt)
    if _defines(reply, entry_point):
        return _unfenced_code(reply, entry_point)
    return _as_body(reply, prompt)  # a bare completion of the prompt, or prose (-> None)


def humaneval_program(reply: str, reference: dict) -> Optional[str]:
    """The test program for one reply: the problem's prompt (its imports and
    helper functions, which replies often leave out), the reply's code (which
    redefines ``entry_point``), the reference tests and ``check(entry_point)``."""
    prompt, entry = reference["prompt"], reference["entry_point"]
    code = extract_code(reply, entry, prompt)
    if code is None:
        return None
    if not code.startswith(prompt.rstrip("\n")):
        # The prompt alone is valid Python (its function body is the docstring).
        code = prompt.rstrip("\n") + "\n\n\n" + code
    return f"{code.rstrip()}\n\n\n{reference['test']}\n\ncheck({entry})\n"


def check_humaneval(reply: str, reference: dict, timeout: float = DEFAULT_TIMEOUT_S) -> ExecResult:
    """Run one reply against its HumanEval tests (see :func:`humaneval_program`)."""
    program = humaneval_program(reply, reference)
    if program is None:
        return ExecResult(False, None, False, "", "no code found in the reply")
    return run_python(program, timeout)


def score_humaneval(
    outputs: list[str], references: list, *, timeout: float = DEFAULT_TIMEOUT_S, workers: int = _WORKERS
) -> list[bool]:
    """Pass/fail of each reply (each is a separate subprocess; ``workers`` at a time)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(lambda pair: check_humaneval(pair[0], pair[1], timeout), zip(outputs, references))
        return [r.passed for r in results]


# --------------------------------------------------------------------------- exact match

_ANSWER_LINE = re.compile(r"^[ \t>*_#-]*(?:final[ \t]+)?answer[ \t]*[*_]*[ \t]*[:：][ \t]*(.*?)[ \t]*$", re.I | re.M)
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
# A number, optionally signed or with a currency sign; thousands separators only
# in groups of three, so "1,2,3" is three numbers and not 123.
_NUMBER = re.compile(r"(?<![\w.])[-+]?\$?[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?!\d)")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u00a0": " ", "\u202f": " "})


def _numbers(text: str) -> list[str]:
    return _NUMBER.findall(text.translate(_MINUS))


def extract_answer(reply: str) -> Optional[str]:
    """The final answer of a reply: the text of its last ``Answer: ...`` line (the
    number in it when there is one, after the last ``=`` if any), else the last
    ``\\boxed{...}``, else the last number in the reply; None if nothing."""
    lines = [m for m in _ANSWER_LINE.findall(reply) if m.strip(" *_")]
    if lines:
        text = lines[-1].strip(" *_")
        boxed = _BOXED.findall(text)
        if boxed:
            text = boxed[-1]
        # "Answer: 3 + 4 = 7" means 7; "Answer: 7 apples (3 + 4)" means 7.
        after_eq = text.rsplit("=", 1)[-1]
        nums = _numbers(after_eq) or _numbers(text)
        return nums[0] if nums else text
    boxed = _BOXED.findall(reply)
    if boxed:
        nums = _numbers(boxed[-1])
        return nums[-1] if nums else boxed[-1].strip()
    nums = _numbers(reply)
    return nums[-1] if nums else None


def _as_number(text: str) -> Optional[Fraction]:
    t = text.translate(_MINUS).strip().rstrip(".").replace(",", "").replace(" ", "")
    t = t.replace("$", "").rstrip("%")
    try:
        return Fraction(t)  # exact: "12.50" == "12.5", "42.0" == "42", "1/2" == "0.5"
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: Optional[str], reference) -> bool:
    """``predicted`` equals ``reference``: numerically when both parse as numbers
    (after dropping ``$``, thousands commas, a trailing ``%`` or ``.``), else as
    case- and whitespace-insensitive text."""
    if predicted is None:
        return False
    ref = str(reference)
    a, b = _as_number(predicted), _as_number(ref)
    if a is not None and b is not None:
        return a == b
    return bool(_norm_text(ref)) and _norm_text(predicted) == _norm_text(ref)


def _norm_text(text: str) -> str:
    return " ".join(text.translate(_MINUS).split()).strip(" .").casefold()


def score_exact_match(outputs: list[str], references: list) -> list[bool]:
    return [answers_match(extract_answer(out), ref) for out, ref in zip(outputs, references)]


# --------------------------------------------------------------------------- registry

SCORERS: dict[str, Callable[..., list[bool]]] = {
    "humaneval": score_humaneval,
    "exact_match": score_exact_match,
}
METRICS: dict[str, str] = {"humaneval": "pass@1", "exact_match": "exact match"}


def score(scorer: str, outputs: list[str], references: list, **options) -> dict:
    """Grade ``outputs`` (one reply per prompt) against ``references`` with the
    scorer named ``scorer`` (a key of :data:`SCORERS`; ``options`` go to it, e.g.
    ``timeout=`` for ``humaneval``). Returns ``{"scorer", "metric", "score"
    (fraction passed, 0.0 for no prompts), "passed", "n", "per_prompt"}``."""
    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}: expected one of {sorted(SCORERS)}")
    if len(outputs) != len(references):
        raise ValueError(f"{len(outputs)} outputs for {len(references)} references: they must be parallel")
    per_prompt = [bool(x) for x in SCORERS[scorer](list(outputs), list(references), **options)]
    passed = sum(per_prompt)
    n = len(per_prompt)
    return {"scorer": scorer, "metric": METRICS[scorer], "score": passed / n if n else 0.0,
            "passed": passed, "n": n, "per_prompt": per_prompt}
