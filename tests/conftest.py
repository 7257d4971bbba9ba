import gc

import pytest

# Under CI=true a skipped engine / server / Ray test is a failure (ci_skip_guard.py).
from ci_skip_guard import pytest_make_collect_report, pytest_runtest_makereport  # noqa: F401


@pytest.fixture(scope="session")
def baseline_outputs():
    """Greedy outputs without speculation, computed once per session.

    Returns (prompts, {prompt: token ids}); the engine is shut down afterwards
    so at most one extra engine is alive at a time."""
    from vllm import SamplingParams

    from engine_utils import MAX_TOKENS, make_llm, prompt_set

    llm = make_llm()
    prompts = prompt_set(llm.get_tokenizer())
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    result = {p: list(o.outputs[0].token_ids) for p, o in zip(prompts, outs)}
    del llm
    gc.collect()
    return prompts, result


@pytest.fixture(scope="session")
def untrained_drafter_cache(tmp_path_factory):
    """A drafters folder holding ``smollm2-135m``: a diffusion drafter made
    straight from the default model's weights (no training; seconds), for
    tests about building, shapes and state rather than acceptance."""
    from engine_utils import model_path
    from vllm_spec_plugins.drafter_training import default_layers
    from vllm_spec_plugins.proposers.block_drafter import hf_config, untrained_drafter

    root = tmp_path_factory.mktemp("drafters")
    target = model_path()
    n = int(hf_config(target)["num_hidden_layers"])
    untrained_drafter(target, "smollm2-135m", default_layers(n), 10, list(range(8192)),
                      str(root / "smollm2-135m"))
    return root


@pytest.fixture(scope="session")
def smoke_drafter(tmp_path_factory):
    """A drafter for the default model produced by the project's own
    ``train-drafter`` command, smoke-sized (a small corpus the model writes,
    a few dozen steps: about two minutes). Returns its directory."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke_drafter") / "smollm2-135m"
    cmd = [sys.executable, "-m", "vllm_spec_plugins.cli", "train-drafter",
           "--target", "smollm2-135m", "--out", str(out), "--prompts", "80",
           "--max-tokens", "64", "--max-steps", "80", "--minutes", "20", "--quiet"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "held-out mean acceptance length" in r.stdout
    return out


@pytest.fixture(scope="session")
def smoke_judge(tmp_path_factory):
    """A judge head for the default model made by the project's own
    ``train-judge`` command, smoke-sized (the target's second choices as
    alternatives, a dozen math problems and six code tasks: a minute or
    two). Returns its directory; its work files stay for the resume test."""
    import subprocess
    import sys

    out = tmp_path_factory.mktemp("smoke_judge") / "smollm2-135m"
    r = subprocess.run(smoke_judge_command(out), capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[train-judge] saved" in r.stdout
    return out


def smoke_judge_command(out) -> list:
    import sys

    return [sys.executable, "-m", "vllm_spec_plugins.cli", "train-judge",
            "--target", "smollm2-135m", "--out", str(out), "--code-tasks", "6",
            "--math-tasks", "12", "--max-tokens", "96", "--per-task", "4", "--window", "24",
            "--dtype", "float32", "--minutes", "10", "--quiet"]
