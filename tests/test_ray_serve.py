"""Ray Serve LLM on CPU, end to end: a local Ray cluster, `serve run` of a
recipe generated like deploy/serve/*.cpu.yaml (the real vLLM CPU engine, the
plugin's suffix_tree proposer), OpenAI client streaming and non-streaming,
acceptance counters from Ray's Prometheus export."""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray.serve.llm")
openai = pytest.importorskip("openai")

from ray_utils import SERVE_PORT, http_get, ray_head, serve_env, serve_run  # noqa: E402

from vllm_spec_plugins.deploy import dump_yaml, serve_config  # noqa: E402

pytestmark = pytest.mark.engine
METRICS_PORT = 8090


def spec_metric(name: str) -> float:
    """Sum of a vLLM spec-decode counter in Ray's Prometheus export."""
    total = 0.0
    for line in http_get(f"http://127.0.0.1:{METRICS_PORT}/metrics").splitlines():
        if not line.startswith("#") and re.search(rf"spec_decode_num_{name}(_total)?\{{", line):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from engine_utils import model_path

    model_dir = model_path()
    tmp = tmp_path_factory.mktemp("serve")
    env = serve_env()
    cfg = serve_config("suffix_tree", model_id="smollm2", model_source=model_dir,
                       target="cpu", num_speculative_tokens=8,
                       engine_kwargs={"dtype": "float32", "enforce_eager": True,
                                      "max_model_len": 2048,
                                      "kv_cache_memory_bytes": 1 << 30})
    path = tmp / "serve.yaml"
    path.write_text(dump_yaml(cfg))
    with ray_head(env, "--num-cpus", "4", "--metrics-export-port", str(METRICS_PORT)):
        with serve_run(path, tmp / "serve.log", env,
                       ready=lambda: "smollm2" in http_get(
                           f"http://127.0.0.1:{SERVE_PORT}/v1/models")):
            yield openai.OpenAI(base_url=f"http://127.0.0.1:{SERVE_PORT}/v1", api_key="none")


PROMPT = [{"role": "user", "content": "Repeat exactly, three times, one per line: "
                                      "the quick brown fox jumps over the lazy dog"}]


def test_serve_chat_streaming_and_not_with_acceptance(served):
    full = served.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=64,
                                          temperature=0)
    text = full.choices[0].message.content
    assert text and full.usage.completion_tokens > 0
    chunks = served.chat.completions.create(model="smollm2", messages=PROMPT, max_tokens=64,
                                            temperature=0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text  # greedy, float32: the same answer either way
    # Ray exports the engine's metrics a few seconds late.
    deadline = time.monotonic() + 60
    while spec_metric("accepted_tokens") <= 0 and time.monotonic() < deadline:
        time.sleep(2)
    assert spec_metric("draft_tokens") > 0
    assert spec_metric("accepted_tokens") > 0
