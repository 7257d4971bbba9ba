"""The README's benchmark numbers are reproducible: every `bench` command in
it parses with the real CLI, and each report under docs/bench/ was made by the
README command that names it (`--out`): the command, validated by the bench
runner itself, gives the report's recorded configuration (model, methods with
their settings, workloads, scenarios, repeats, every other option), and the
report's runs and summary cover exactly those methods × workloads × scenarios
× repeats.

One allowance: a report that the README itself labels as an earlier run made
before a method gained settings (``EARLIER_RUNS``) may lack the settings added
since; every setting it does record must still be today's value."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest

from vllm_spec_plugins.bench import runner as bench_runner
from vllm_spec_plugins.bench.runner import config_from_args
from vllm_spec_plugins.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
# Recorded where the run was made; a report is copied into docs/bench/ afterwards.
NOT_COMPARED = {"out"}
# Options added after some reports were made -> the value those runs had in effect.
# A report without the key must have been made by a command at that value.
ADDED_LATER = {"cpu_preload": "auto", "draft_model_k": None}
# Reports the README labels as made before a method gained settings: report -> the
# words of the README's label for it.
EARLIER_RUNS = {"docs/bench/qwen15": "before Token Recycling's calibration",
                "docs/bench/qwen15_cascade": "before the sliding window",
                "docs/bench/qwen15_cascade_v2": "before the prompt was read when needed"}
# Settings whose default changed after an earlier run (the README's table names
# the value that run had): their recorded values stand.
CHANGED_SINCE = {"docs/bench/qwen15_cascade": {"cpu_packing"}}


def _without_added_settings(recorded: dict, today: dict, changed=frozenset()) -> dict:
    """``today`` restricted to the keys ``recorded`` has (recursively, lists of
    settings element by element); keys in ``changed`` keep the recorded value."""
    out = {}
    for key, value in today.items():
        if key not in recorded:
            continue
        if key in changed:
            value = recorded[key]
        elif isinstance(value, dict) and isinstance(recorded[key], dict):
            value = _without_added_settings(recorded[key], value, changed)
        elif (isinstance(value, list) and isinstance(recorded[key], list)
              and len(value) == len(recorded[key])
              and all(isinstance(v, dict) and isinstance(r, dict)
                      for v, r in zip(value, recorded[key]))):
            value = [_without_added_settings(r, v, changed)
                     for r, v in zip(recorded[key], value)]
        out[key] = value
    return out


def readme_bench_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(".venv/bin/vllm-spec-plugins bench"):
                cmds.append(shlex.split(line)[1:])
    return cmds


def report_commands() -> list[list[str]]:
    return [c for c in readme_bench_commands() if "--out" in c]


def test_readme_bench_commands_found():
    text = (ROOT / "README.md").read_text()
    # Every mention of the command at the start of a line in a bash block is picked up.
    n_lines = len(re.findall(r"^\.venv/bin/vllm-spec-plugins bench", text, flags=re.M))
    assert len(readme_bench_commands()) == n_lines >= 5


@pytest.mark.parametrize("argv", readme_bench_commands(), ids=lambda c: " ".join(c[1:]) or "bench")
def test_every_readme_bench_command_parses(argv):
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's way of rejecting a command line
        pytest.fail(f"README command does not parse (exit {e.code}): {shlex.join(argv)}")
    assert args.func.__name__ == "_cmd_bench"


def test_readme_has_bench_commands_for_its_reports():
    outs = [c[c.index("--out") + 1] for c in report_commands()]
    assert "docs/bench/smollm2_all" in outs and "docs/bench/smollm2_online" in outs
    assert len(outs) == len(set(outs)), "two README commands write the same report"
    # Every report of the `bench` runner under docs/bench/ is reproducible from a
    # README `bench` command (checked in detail below).
    reports = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "docs/bench").glob("*/results.json")
               if _is_bench_runner_report(p)}
    assert reports <= set(outs), f"reports without a README command: {reports - set(outs)}"


def test_every_report_has_a_readme_command():
    """Reports of the other benchmarks (step stalls, soak, CPU preload) are named
    by the README command that writes them too."""
    text = (ROOT / "README.md").read_text()
    # A command may start with environment settings (`HF_HUB_OFFLINE=1 .venv/bin/...`).
    env = r"(?:[A-Z_][A-Z0-9_]*=\S+ )*"
    commands = re.findall(rf"`({env}\.venv/bin/[^`\n]*)`", text)
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        commands += re.sub(r"\\\n\s*", " ", block).splitlines()
    outs = set()
    for cmd in commands:
        argv = shlex.split(cmd.split("  #")[0]) if re.match(rf"\s*{env}\.venv/bin/", cmd) else []
        if "--out" in argv[:-1]:
            outs.add(argv[argv.index("--out") + 1].rstrip("/"))
    reports = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "docs/bench").glob("*/results.json")}
    assert reports, "no reports found under docs/bench"
    assert reports <= outs, f"reports without a README command: {reports - outs}"


def _is_bench_runner_report(path: Path) -> bool:
    data = json.loads(path.read_text())
    return isinstance(data, dict) and {"config", "runs", "summary"} <= data.keys()


@pytest.mark.parametrize("argv", report_commands(), ids=lambda c: c[c.index("--out") + 1])
def test_readme_bench_command_made_the_report_it_names(argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # method config paths in the commands are relative to the repo
    args = build_parser().parse_args(argv)
    results = ROOT / args.out / "results.json"
    assert results.is_file(), f"{args.out}: no results.json (the README points at it)"
    data = json.loads(results.read_text())
    rec = data["config"]

    # The command, as the bench runner validates it. Whether vLLM's `suffix` joins
    # `all` depends on arctic_inference being installed: take what the run found.
    had_arctic = not any("arctic_inference" in n for n in rec["notes"])
    # The default dtype follows the CPU the report was made on: a float32 report
    # made without --dtype must carry the note saying why, a bfloat16 one none.
    dtype_note = next((n for n in rec["notes"] if n.startswith("note: dtype ")), None)
    monkeypatch.setattr(bench_runner, "default_dtype",
                        lambda: (rec["dtype"], dtype_note) if dtype_note else ("bfloat16", None))
    cfg = config_from_args(args, has_arctic=had_arctic)
    want = asdict(cfg)
    # 'all' leaves out each target-specific method (with a note) since that method
    # exists; reports made before it lack its note.
    from vllm_spec_plugins.bench.methods import target_specific_methods

    later = target_specific_methods()
    want["notes"] = [n for n in want["notes"]
                     if n in rec["notes"] or not any(f"'{m}'" in n for m in later)]

    for key, value in want.items():
        if key in NOT_COMPARED or key == "methods":
            continue
        if key not in rec and key in ADDED_LATER:
            assert value == ADDED_LATER[key], f"{args.out}: made before {key} existed, the " \
                f"command gives {value!r}"
            continue
        assert rec[key] == value, f"{args.out}: {key} recorded {rec[key]!r}, the command gives {value!r}"
    assert rec["scenarios"] == [name for name, _, _ in cfg.scenarios()]

    # Methods: same labels in the same order, same kinds and plugin settings (the
    # settings come from configs/<method>.json or the named .json file today).
    def method_key(m: dict) -> tuple:
        return (m["label"], m["kind"], m["plugin_method"], m["lossless"],
                json.dumps(m["settings"], sort_keys=True))

    want_methods = want["methods"]
    if args.out in EARLIER_RUNS:
        label = EARLIER_RUNS[args.out]
        readme = (ROOT / "README.md").read_text()
        assert any(f"{args.out}/" in line and "earlier run" in line and label in line
                   for line in readme.splitlines()), f"README no longer labels {args.out} an earlier run"
        by_label = {m["label"]: m for m in rec["methods"]}
        want_methods = [{**m, "settings": _without_added_settings(
            by_label.get(m["label"], {}).get("settings", {}), m["settings"],
            CHANGED_SINCE.get(args.out, frozenset()))} for m in want_methods]
    got = [method_key(m) for m in rec["methods"]]
    expected = [method_key(m) for m in want_methods]
    assert [g[0] for g in got] == [e[0] for e in expected], f"{args.out}: methods differ"
    for g, e in zip(got, expected):
        assert g == e, f"{args.out}: method {g[0]!r} recorded {g[1:]}, the command gives {e[1:]}"

    # What was run and reported is exactly that: every method in every repeat,
    # every workload in every scenario, nothing else.
    labels = [m.label for m in cfg.methods]
    scenarios = rec["scenarios"]
    assert [w["name"] for w in data["workloads"]] == cfg.workloads
    runs = {(r["label"], r["repeat"]) for r in data["runs"]}
    assert len(runs) == len(data["runs"])
    assert runs == {(m, r) for m in labels for r in range(cfg.repeats)}
    for run in data["runs"]:
        cells = [(x["workload"], x["scenario"]) for x in run["measurements"]]
        if run["status"] == "ok":
            assert sorted(cells) == sorted((w, s) for w in cfg.workloads for s in scenarios), run["label"]
    rows = {(r["workload"], r["scenario"], r["method"]) for r in data["summary"]}
    assert len(rows) == len(data["summary"])
    assert rows == {(w, s, m) for w in cfg.workloads for s in scenarios for m in labels}
    assert {r["repeats_total"] for r in data["summary"]} == {cfg.repeats}
