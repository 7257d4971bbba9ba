"""On a vLLM it does not support, the plugin must not break vLLM: an engine
without the plugin's config starts; one that selects it fails at startup with
the message (supported versions, the extra to install, the override).

Each case runs in its own process with vLLM's version faked (vllm.__version__
set before the engine is built; engine core and worker in that one process,
so the fake reaches them)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("vllm")

pytestmark = pytest.mark.engine

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    import vllm
    vllm.__version__ = "0.99.0"
    from vllm import LLM, SamplingParams
    sys.path.insert(0, {tests!r})
    from engine_utils import model_path
    from vllm_spec_plugins.engine_config import speculative_config
    kw = dict(model=model_path(), dtype="float32", max_model_len=512, seed=0,
              kv_cache_memory_bytes=256 << 20, enforce_eager=True)
    if sys.argv[1] == "plugin":
        kw.update(speculative_config=speculative_config(4),
                  additional_config={{"spec_plugins": {{"method": "suffix_tree"}}}})
    try:
        llm = LLM(**kw)
        out = llm.generate(["The capital of France is"],
                           SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
        print("GENERATED", len(out[0].outputs[0].token_ids))
    except Exception as e:
        print("STARTUP-ERROR", type(e).__name__, e)
""")


def run(mode: str) -> subprocess.CompletedProcess:
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {k: v for k, v in os.environ.items() if k != "VSP_ALLOW_UNSUPPORTED_VLLM"}
    env["VLLM_PLUGINS"] = "vllm_spec_plugins"
    return subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests), mode],
                          capture_output=True, text=True, timeout=600, env=env)


def test_engine_without_the_plugin_config_still_works():
    p = run("plain")
    out = p.stdout + p.stderr
    assert "GENERATED 4" in p.stdout, out[-3000:]
    assert "supports vLLM 0.32.0 but found vLLM 0.99.0" in out  # the one warning
    assert out.count("supports vLLM 0.32.0 but found vLLM 0.99.0") == 1


def test_engine_selecting_the_plugin_fails_at_startup_with_the_message():
    p = run("plugin")
    out = p.stdout + p.stderr
    assert "GENERATED" not in p.stdout, out[-3000:]
    assert "STARTUP-ERROR" in p.stdout, out[-3000:]
    for needle in ("supports vLLM 0.32.0 but found vLLM 0.99.0", "vllm-spec-plugins[cpu]",
                   "VSP_ALLOW_UNSUPPORTED_VLLM=1"):
        assert needle in out, needle
