"""The Ray Data recipe (deploy/ray_data/batch_infer.py) on a local CPU Ray:
the real vLLM engine in Ray Data's vLLM stage with a proposer of this package,
outputs token-identical to plain vLLM without speculation (greedy, float32)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray.data.llm")

pytestmark = pytest.mark.engine
ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "deploy" / "ray_data" / "batch_infer.py"
ROWS = [{"id": 1, "prompt": "Write a haiku about the sea."},
        {"id": 2, "prompt": "Repeat three times: the quick brown fox jumps over the lazy dog."},
        {"id": 3, "messages": [{"role": "user", "content": "Say hello in French."}],
         "tag": "kept"}]


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_PLUGINS="vllm_spec_plugins", HF_HUB_OFFLINE="1",
               RAY_USAGE_STATS_ENABLED="0", RAY_ADDRESS="local")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_batch_inference_matches_plain_vllm(tmp_path):
    from engine_utils import make_llm, model_path
    from vllm import SamplingParams

    src = tmp_path / "prompts.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "out"
    r = run_script("--input", str(src), "--output", str(out), "--model", model_path(),
                   "--method", "suffix_recycling", "--cpu", "--num-cpus", "6",
                   "--max-tokens", "48", "--dtype", "float32")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    got = [json.loads(line) for f in sorted(out.glob("*.json*"))
           for line in f.read_text().splitlines() if line.strip()]
    got.sort(key=lambda g: g["id"])
    assert [g["id"] for g in got] == [1, 2, 3]
    assert got[2]["tag"] == "kept" and got[0]["prompt"] == ROWS[0]["prompt"]  # input kept
    llm = make_llm()  # no speculation
    ref = llm.generate([g["rendered_prompt"] for g in got],
                       SamplingParams(temperature=0, max_tokens=48), use_tqdm=False)
    for g, o in zip(got, ref):
        assert g["generated_text"] == o.outputs[0].text
        assert g["num_generated_tokens"] == len(o.outputs[0].token_ids) > 0


@pytest.mark.parametrize("args,needle", [
    (["--method", "nope"], "unknown method 'nope'"),
    (["--settings", '{"min_token_probb": 1}'], "spec_plugins.min_token_probb"),
])
def test_bad_input_exits_2_naming_it(tmp_path, args, needle):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    r = run_script("--input", str(src), "--output", str(tmp_path / "o"), "--model", "/m", *args,
                   timeout=120)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_bad_jsonl_line_names_the_line(tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"prompt": "hi"}\n{"text": "no prompt"}\n')
    r = run_script("--input", str(src), "--output", str(tmp_path / "o"), "--model", "/m",
                   timeout=120)
    assert r.returncode != 0 and f"{src}:2" in r.stderr and "Traceback" not in r.stderr
