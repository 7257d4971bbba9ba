"""The suffix-tree proposer on the real vLLM CPU engine (SmolLM2-135M, float32)."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from engine_utils import (  # noqa: E402
    MAX_TOKENS,
    abort_one_of_two,
    check_sampled_digits_follow_the_model,
    cpu_expand_kernel_broken,
    delta,
    plugin_llm,
    settled_drafter_state,
    spec_counters,
)

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def budget_file(tmp_path_factory):
    return tmp_path_factory.mktemp("budget") / "budget.npz"


@pytest.fixture(scope="module")
def llm(budget_file):
    engine = plugin_llm("suffix_tree", k=8, draft_budget={"state_path": str(budget_file)})
    yield engine
    del engine


def _save_state(worker):
    from vllm_spec_plugins.integration import save_proposer_state

    return save_proposer_state(worker)


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
    kept = abort_one_of_two(llm, lambda snap: snap["tracked_requests"] >= 1, max_tokens=200)
    assert len(kept.outputs[0].token_ids) > 0
    state = settled_drafter_state(llm)
    assert state["tracked_requests"] == 0


# -- random sampling -----------------------------------------------------------
# vLLM 0.32's CPU build spreads temperature/top-p over draft positions wrongly
# (uninitialised memory), so sampling with any proposer is wrong there unless the
# plugin's work-around (integration/vllm_cpu_fixes.py) is active. The probe runs
# the kernel the workers will register, in this process, after loading the plugins.
_SAMPLER_BROKEN = pytest.mark.xfail(
    cpu_expand_kernel_broken(), run=False, strict=True,
    reason="vLLM 0.32 CPU expand_kernel returns garbage temperatures for draft "
           "positions (see vllm_spec_plugins/integration/vllm_cpu_fixes.py)")
REPEAT_PROMPT = "the cat sat on the mat. the cat sat on the mat. the cat"


def _set_global_cache(worker, on: bool) -> bool:
    """For collective_rpc: switch the suffix tree's global cache and the draft
    budget (both learn from every request); returns the old cache setting."""
    drafter = worker.model_runner.drafter
    proposer = drafter.proposer
    old = proposer.config.use_global_cache
    proposer.config.use_global_cache = on
    drafter.budget.enabled = on
    return old


def test_random_sampling_lengths_and_drafts_accepted(llm):
    # A handful of requests only: vLLM 0.32 CPU crashes on seeded requests whose
    # prefill is chunked ("CPU Generator does not use offset"), so keep it small.
    prompts = [REPEAT_PROMPT] * 3 + ["List the days of the week:", "Count: one, two, three,"]
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=48, ignore_eos=True,
                             seed=10 + i) for i in range(len(prompts))]
    before = spec_counters(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    after = spec_counters(llm)
    # Exactly the requested length, as without speculation: accepted drafts never
    # overshoot max_tokens, and the run is not cut short.
    for o in outs:
        assert len(o.outputs[0].token_ids) == 48, (o.prompt, len(o.outputs[0].token_ids))
        assert o.outputs[0].finish_reason == "length"
    # Under sampling the proposer still drafts and the random verifier accepts some
    # drafts (the repeated sentence makes long, likely drafts).
    assert delta(after, before, "drafts") > 0
    assert delta(after, before, "accepted_tokens") > 0
    first_pos = after["accepted_tokens_per_pos"][0] - before.get("accepted_tokens_per_pos", [0])[0]
    assert first_pos > 0


@_SAMPLER_BROKEN
def test_seeded_sampling_is_reproducible(llm):
    """The same per-request seeds give the same tokens. The global cache and the
    draft budget are off for this test: with them, run 1 changes run 2's drafts
    (cached responses; the budget's calibration and price), and a different
    draft consumes the request's random stream differently (one accept/reject draw
    per draft token), so only the distribution, not the tokens, would repeat."""
    prompts = [REPEAT_PROMPT, REPEAT_PROMPT, "Write a haiku about the sea."]
    params = [SamplingParams(temperature=0.8, top_p=0.95, max_tokens=32, seed=100 + i)
              for i in range(len(prompts))]
    (old,) = llm.collective_rpc(_set_global_cache, args=(False,))
    try:
        runs = []
        for _ in range(2):
            before = spec_counters(llm)
            outs = llm.generate(prompts, params, use_tqdm=False)
            after = spec_counters(llm)
            assert delta(after, before, "drafts") > 0
            runs.append([list(o.outputs[0].token_ids) for o in outs])
    finally:
        llm.collective_rpc(_set_global_cache, args=(old,))
    assert runs[0] == runs[1]


@_SAMPLER_BROKEN
def test_sampled_tokens_follow_the_model_distribution(llm):
    """Lossless under sampling: a token verified against a draft is distributed as
    the model says, as it would be without speculation.

    The prompt lists ``A: <digit>`` three times, so after ``A`` the model writes
    ``:`` and `` `` (p ~ 0.997, 0.983) and then a digit it is unsure about
    (p('7') ~ 0.5, the rest spread). The suffix tree drafts ``: 5`` / ``: 7``
    from the prompt, so the digit is decided by the rejection sampler. We sample
    N continuations of 3 tokens at temperature 1 (no top-p/top-k: the sampling
    distribution is exactly softmax(logits)), keep those that start with the
    usual ``: ``, and compare the digit's empirical distribution with the exact
    one from the model's own logprobs for that context (what no speculation
    samples from)."""
    check_sampled_digits_follow_the_model(llm)


def test_draft_budget_learns_from_what_the_engine_accepted(llm, baseline_outputs):
    """The budget's feedback path on the real engine: what it records as
    accepted is what vLLM counted (less the drafts of each request's last
    step, which no later step reports), and its calibration curve fills."""
    prompts, _ = baseline_outputs
    before_state = settled_drafter_state(llm)["draft_budget"]
    before = spec_counters(llm)
    llm.generate(prompts, GREEDY, use_tqdm=False)
    after = spec_counters(llm)
    state = settled_drafter_state(llm)["draft_budget"]
    vllm_accepted = delta(after, before, "accepted_tokens")
    ours = state["accepted_tokens"] - before_state["accepted_tokens"]
    assert vllm_accepted > 0
    assert 0.8 * vllm_accepted <= ours <= vllm_accepted, (ours, vllm_accepted)
    assert state["verified_rows"] > before_state["verified_rows"]
    assert state["calibration"] and state["price"] is not None
    assert state["kept_tokens"] <= state["proposed_tokens"]


def test_draft_budget_calibration_saved_to_its_state_file(llm, budget_file):
    """What the engine's budget learnt is in its state file, and a new budget
    of the same method starts from it."""
    from vllm_spec_plugins.config import DraftBudgetConfig
    from vllm_spec_plugins.integration.draft_budget import DraftBudget

    assert llm.collective_rpc(_save_state) == [True]
    learnt = settled_drafter_state(llm)["draft_budget"]
    restarted = DraftBudget(DraftBudgetConfig(state_path=str(budget_file)), None,
                            method="suffix_tree")
    assert restarted.loaded_tokens > 0
    assert sorted(restarted.calibrator.curve()) == sorted(learnt["calibration"])
