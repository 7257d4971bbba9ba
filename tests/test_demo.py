"""The demo's quiet mode without an engine: everything a child process writes to
fd 1/2 lands in the log file, progress lines reach the terminal."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from vllm_spec_plugins.demo import Progress, output_to_file


SCRIPT = """
import subprocess, sys
from pathlib import Path
from vllm_spec_plugins.demo import output_to_file

log = Path(sys.argv[1])
try:
    with output_to_file(log) as terminal:
        print("python stdout")
        print("python stderr", file=sys.stderr)
        subprocess.run([sys.executable, "-c",
                        "import sys; print('child out'); print('child err', file=sys.stderr)"],
                       check=True)
        terminal.write("progress line\\n")
        if sys.argv[2] == "fail":
            raise RuntimeError("boom")
except RuntimeError:
    print("caught", file=sys.stderr)
print("after")
"""


# A fresh process, as the CLI runs: pytest's own capture replaces sys.stdout.
@pytest.mark.parametrize("mode", ["ok", "fail"])
def test_output_to_file_catches_children_and_keeps_the_terminal(tmp_path, mode):
    log = tmp_path / "sub" / "demo.log"
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(log), mode],
                         capture_output=True, text=True, check=True)
    text = log.read_text()
    for line in ("python stdout", "python stderr", "child out", "child err"):
        assert line in text
        assert line not in res.stdout and line not in res.stderr
    assert res.stdout.splitlines() == ["progress line", "after"]
    assert ("caught" in res.stderr) == (mode == "fail")  # restored after an error too


def test_progress_lines_count_and_time():
    buf = io.StringIO()
    p = Progress(buf, total=2)
    p.start("suffix_tree", "starting the engine")
    p.done()
    p.index += 1
    p.start("suffix_tree", "generating")
    p.done(", 9.0 tokens/s")
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("[1/2] suffix_tree: starting the engine ... ") and lines[0].endswith(" s")
    assert lines[1].startswith("[2/2] suffix_tree: generating ... ") and lines[1].endswith("9.0 tokens/s")
