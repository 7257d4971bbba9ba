"""The target top-k capture (integration layer) on the real vLLM CPU engine.

A probe proposer checks, under greedy decoding, that the top-1 the capture
hands it at each verification-window position is the token the engine then
emits there -- which holds only if rows, requests and positions line up."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from engine_utils import MAX_TOKENS, delta, drafter_state, plugin_llm, settled_drafter_state, spec_counters  # noqa: E402

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def llm():
    engine = plugin_llm("topk_probe_proposer:TopkProbeProposer", k=6, topk=4)
    yield engine
    del engine


def test_captured_topk_lines_up_with_emitted_tokens(llm, baseline_outputs):
    prompts, expected = baseline_outputs
    before = spec_counters(llm)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS),
                        use_tqdm=False)
    after = spec_counters(llm)
    stats = drafter_state(llm)["proposer_stats"]
    assert stats["violations"] == 0, stats["first_violation"]
    # every emitted token was checked against a captured row, many with drafts in the
    # window (the runner may hold a few tokens more than the output: vLLM trims the
    # tokens accepted past max_tokens / a stop from the output, not from the runner)
    emitted = sum(len(o.outputs[0].token_ids) for o in outs)
    assert emitted <= stats["checked"] <= emitted + len(prompts) * 8
    assert stats["with_drafts"] > 10
    assert delta(after, before, "accepted_tokens") > 0
    assert delta(after, before, "draft_tokens") > delta(after, before, "accepted_tokens")  # some rejected
    # lossless: the capture only reads the logits
    assert [list(o.outputs[0].token_ids) for o in outs] == [expected[p] for p in prompts]


def test_capture_with_random_sampling_and_state_released(llm):
    prompts = ["Write a limerick about a cat.", "the cat sat on the mat. the cat sat on the"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.8, top_p=0.95, seed=1, max_tokens=32),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in outs)
    snap = settled_drafter_state(llm)
    assert snap["tracked_requests"] == 0
    assert snap["captured_rows"] > 0 and snap["errors"] == 0
