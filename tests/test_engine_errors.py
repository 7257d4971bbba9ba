"""Bad input and failing proposers, on the real vLLM CPU engine."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from engine_utils import MAX_TOKENS, make_llm, plugin_llm, settled_drafter_state  # noqa: E402

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.mark.parametrize("settings, needle", [
    ({"method": "suffix_tree", "min_token_probb": 0.2}, "spec_plugins.min_token_probb"),
    ({"method": "suffix_tree", "max_tree_depth": "deep"}, "spec_plugins.max_tree_depth"),
    ({"method": "no_such_method"}, "unknown method 'no_such_method'"),
    (None, "spec_plugins.method is required"),
])
def test_bad_settings_fail_at_startup_naming_the_field(settings, needle):
    from vllm_spec_plugins.engine_config import speculative_config

    extra = {"additional_config": {"spec_plugins": settings}} if settings else {}
    with pytest.raises(ValueError) as err:
        make_llm(speculative_config=speculative_config(4), **extra)
    assert needle in str(err.value)


@pytest.fixture(scope="module")
def flaky_llm():
    engine = plugin_llm("flaky_proposer:FlakyProposer", k=8)
    yield engine
    del engine


def test_failing_proposer_costs_drafts_not_requests(flaky_llm, baseline_outputs):
    prompts, expected = baseline_outputs
    outs = flaky_llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, o in zip(prompts, outs):
        assert list(o.outputs[0].token_ids) == expected[p]
    state = settled_drafter_state(flaky_llm)
    assert state["errors"] > 0
    assert state["drafted_tokens"] > 0  # the rows that did not fail still drafted
    assert state["tracked_requests"] == 0


def test_failing_request_start_still_finishes(flaky_llm):
    engine = flaky_llm.llm_engine
    engine.add_request("boom-1", "the cat sat on the mat. the cat sat on the", GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.finished]
    assert outs and len(outs[0].outputs[0].token_ids) > 0
    engine.step()
    assert settled_drafter_state(flaky_llm)["tracked_requests"] == 0
