"""The README's demo on the real engine, run as a user runs it (the CLI in a
fresh process): the terminal shows progress and the result table, vLLM's logs
go to the file it names; `--verbose` shows them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

VLLM_LOG_MARKERS = ("INFO ", "WARNING ")


def _demo(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    from engine_utils import model_path

    model_path()  # provisioned (or the skip guard says why not)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "vllm_spec_plugins.cli", "demo", "--max-tokens",
                           "24", "--enforce-eager", *extra], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)


def test_demo_is_quiet_and_names_its_log(tmp_path):
    res = _demo(tmp_path, "--log-file", "logs/demo.log")
    assert res.returncode == 0, res.stdout + res.stderr
    out = res.stdout
    log = tmp_path / "logs" / "demo.log"
    assert f"vLLM's logs: {log}" in out
    assert "[1/2] no speculation: starting the engine ... " in out
    assert "[2/2] suffix_tree: generating 8 prompts x 24 tokens ... " in out
    assert "greedy outputs identical: yes (8/8)" in out
    assert any(line.startswith("suffix_tree ") for line in out.splitlines())
    # Nothing of vLLM on the terminal, all of it in the log.
    for marker in VLLM_LOG_MARKERS:
        assert marker not in out and marker not in res.stderr, marker
    assert len(out.splitlines()) < 30
    text = log.read_text()
    assert "INFO " in text and "vllm" in text.lower()
