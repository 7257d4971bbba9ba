"""The README's benchmark numbers are reproducible: every `bench` command in
it parses with the real CLI, and the report it points at (`--out`) was made
by that same command (model, methods, workloads, scenarios, repeats)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from vllm_spec_plugins.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


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


def test_readme_has_bench_commands_for_its_reports():
    outs = [c[c.index("--out") + 1] for c in readme_bench_commands() if "--out" in c]
    assert "docs/bench/smollm2_all" in outs and "docs/bench/smollm2_online" in outs
    # Every report directory under docs/bench/ is reproducible from a README command.
    reports = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "docs/bench").glob("*/results.json")}
    assert reports <= set(outs), f"reports without a README command: {reports - set(outs)}"


@pytest.mark.parametrize("argv", [c for c in readme_bench_commands() if "--out" in c],
                         ids=lambda c: c[c.index("--out") + 1])
def test_readme_bench_command_made_the_report_it_names(argv):
    args = build_parser().parse_args(argv)
    results = ROOT / args.out / "results.json"
    assert results.is_file(), f"{args.out}: no results.json (the README points at it)"
    cfg = json.loads(results.read_text())["config"]
    assert cfg["model"] == args.model
    assert cfg["workloads"] == args.workloads.split(",")
    assert cfg["num_prompts"] == args.num_prompts and cfg["max_tokens"] == args.max_tokens
    assert cfg["repeats"] == args.repeats and cfg["mode"] == args.mode
    if args.mode in ("offline", "both"):
        assert cfg["batch_sizes"] == [int(b) for b in args.batch_sizes.split(",")]
    if args.mode in ("online", "both"):
        assert cfg["concurrency"] == [int(c) for c in args.concurrency.split(",")]
    ran = {m["label"] for m in cfg["methods"]}
    if args.methods != "all":
        wanted = {Path(m).stem for m in args.methods.split(",")}
        assert wanted == ran, (wanted, ran)
