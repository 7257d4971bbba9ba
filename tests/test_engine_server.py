"""The OpenAI-compatible server path with the plugin (real vLLM CPU engine)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytest.importorskip("vllm")
from engine_utils import model_path  # noqa: E402

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    spec = {"method": "custom_class", "model": "vllm_spec_plugins.integration.PluginDrafter",
            "num_speculative_tokens": 8}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path(),
           "--served-model-name", "smol", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "2048", "--kv-cache-memory-bytes",
           str(1 << 30), "--enforce-eager", "--speculative-config", json.dumps(spec),
           "--additional-config", json.dumps({"spec_plugins": {"method": "suffix_tree"}})]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _get(base + "/health")
            break
        except OSError:
            time.sleep(2)
    else:
        proc.kill()
        pytest.fail(f"server did not start in 300 s:\n{log.read_text()[-3000:]}")
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_chat_completion_drafts_and_accepts(server):
    text = "the cat sat on the mat. " * 6
    body = {"model": "smol", "temperature": 0, "max_tokens": 48,
            "messages": [{"role": "user", "content": f"Repeat this text exactly: {text}"}]}
    out = _post(server + "/v1/chat/completions", body)
    assert out["choices"][0]["message"]["content"]
    metrics = _get(server + "/metrics")
    accepted = [line for line in metrics.splitlines()
                if line.startswith("vllm:spec_decode_num_accepted_tokens_total")]
    assert accepted and float(accepted[0].split()[-1]) > 0, accepted
    # The drafter's own counters (engine process) reach the API server's /metrics.
    drafted = [line for line in metrics.splitlines()
               if line.startswith('vsp_drafter_drafted_tokens_total{method="suffix_tree"}')]
    assert drafted and float(drafted[0].split()[-1]) > 0, drafted
    assert 'vsp_draft_budget_tokens_total{method="suffix_tree",stage="kept"}' in metrics
