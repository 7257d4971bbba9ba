"""The suffix-tree proposer on the real vLLM CPU engine (SmolLM2-135M, float32)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from engine_utils import MAX_TOKENS, delta, drafter_state, plugin_llm, settled_drafter_state, spec_counters  # noqa: E402

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def llm():
    engine = plugin_llm("suffix_tree", k=8)
    yield engine
    del engine


def test_greedy_outputs_identical_to_no_speculation(llm, baseline_outputs):
    prompts, expected = baseline_outputs
    before = spec_counters(llm)
    # One call: all prompts run as concurrent requests of different lengths.
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    after = spec_counters(llm)
    mismatched = [p[:60] for p, o in zip(prompts, outs)
                  if list(o.outputs[0].token_ids) != expected[p]]
    assert not mismatched, f"outputs differ from no speculation for: {mismatched}"
    # Drafting really happened and was accepted (repetitive prompts are in the set).
    assert delta(after, before, "drafts") > 0
    assert delta(after, before, "accepted_tokens") > 0


def test_single_requests_identical(llm, baseline_outputs):
    prompts, expected = baseline_outputs
    for p in (prompts[-1], prompts[-2]):  # repetitive text, long prompt
        out = llm.generate([p], GREEDY, use_tqdm=False)[0]
        assert list(out.outputs[0].token_ids) == expected[p]


def test_repetitive_prompt_accepts_long_drafts(llm, baseline_outputs):
    prompts, _ = baseline_outputs
    before = spec_counters(llm)
    llm.generate([prompts[-1]], GREEDY, use_tqdm=False)
    after = spec_counters(llm)
    drafts = delta(after, before, "drafts")
    accepted = delta(after, before, "accepted_tokens")
    assert drafts > 0 and 1 + accepted / drafts > 2.0, (drafts, accepted)


def test_global_cache_helps_a_repeated_request(llm):
    msgs = [{"role": "user", "content": "Write a short poem about autumn leaves in a park."}]
    prompt = llm.get_tokenizer().apply_chat_template(msgs, add_generation_prompt=True,
                                                     tokenize=False)
    runs = []
    for _ in range(2):
        before = spec_counters(llm)
        out = llm.generate([prompt], GREEDY, use_tqdm=False)[0]
        after = spec_counters(llm)
        runs.append((list(out.outputs[0].token_ids), delta(after, before, "accepted_tokens")))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) > 16
    # The second time the whole answer is in the global cache.
    assert runs[1][1] > runs[0][1]
    assert runs[1][1] >= 0.5 * len(runs[1][0])


def test_no_state_left_after_requests_finish(llm):
    llm.generate(["Count from one to ten:"], GREEDY, use_tqdm=False)
    state = settled_drafter_state(llm)
    assert state["tracked_requests"] == 0
    assert state["errors"] == 0
    assert state["steps"] > 0


def test_abort_mid_generation_frees_state(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=200)
    engine.add_request("abort-me", "Tell me a long story about a dragon.", params)
    engine.add_request("keep-me", "List the numbers from 1 to 30.", params)
    for _ in range(6):
        engine.step()
    assert drafter_state(llm)["tracked_requests"] >= 1
    engine.abort_request(["abort-me"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out
    assert "keep-me" in finished and len(finished["keep-me"].outputs[0].token_ids) > 0
    engine.step()  # let the runner see the last finished ids
    state = settled_drafter_state(llm)
    assert state["tracked_requests"] == 0


def test_random_sampling_finishes(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, seed=1)
    outs = llm.generate(["the cat sat on the mat. the cat sat on the mat. the cat"] * 3,
                        params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) > 0 for o in outs)
