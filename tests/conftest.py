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
