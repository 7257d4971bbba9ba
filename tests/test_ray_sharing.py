"""Suffix cache shared across replicas through the Ray hub actor, on the real
vLLM CPU engine: replica A serves a request and pushes its response; replica
B (a fresh engine, as after a restart or on another node) pulls it and drafts
the same request from it; with the hub gone, B keeps serving from its local
cache. Lossless throughout (float32 greedy = no speculation)."""

from __future__ import annotations

import gc
import uuid

import pytest

pytest.importorskip("vllm")
ray = pytest.importorskip("ray")
from vllm import SamplingParams  # noqa: E402

from engine_utils import delta, make_llm, spec_counters  # noqa: E402

pytestmark = pytest.mark.engine
GREEDY = SamplingParams(temperature=0.0, max_tokens=96)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             namespace="vllm-spec-plugins")
    yield
    ray.shutdown()


def replica(hub: str, **sharing):
    from vllm_spec_plugins.integration import speculative_config

    return make_llm(speculative_config=speculative_config(8),
                    additional_config={"spec_plugins": {"method": "suffix_tree"},
                                       "spec_plugins_sharing": {"hub": hub, "interval_s": 0.5,
                                                                "retry_s": 1.0, **sharing}})


def flush(llm) -> dict:
    from vllm_spec_plugins.integration import flush_shared_state

    (stats,) = llm.collective_rpc(flush_shared_state)
    return stats


def accepted(llm, prompts) -> tuple[list[list[int]], float]:
    before = spec_counters(llm)
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    return ([list(o.outputs[0].token_ids) for o in outs],
            delta(spec_counters(llm), before, "accepted_tokens"))


def test_response_on_replica_a_speeds_up_replica_b(cluster):
    hub = f"hub-{uuid.uuid4().hex[:8]}"
    # An essay-like answer: little in the prompt to copy from, so the draft
    # for it has to come from a cached response.
    prompt = ["<|im_start|>user\nWrite a short story about a lighthouse keeper who finds a "
              "message in a bottle.<|im_end|>\n<|im_start|>assistant\n"]
    plain = make_llm()
    expected = [list(o.outputs[0].token_ids) for o in plain.generate(prompt, GREEDY,
                                                                     use_tqdm=False)]
    del plain
    gc.collect()

    a = replica(hub)
    out_a, acc_a = accepted(a, prompt)
    assert out_a == expected
    stats = flush(a)
    assert stats["pushed"] >= 1 and stats["sync_errors"] == 0
    del a
    gc.collect()

    b = replica(hub)
    try:
        stats = flush(b)  # a fresh replica pulls what the hub holds
        assert stats["shared_in"] >= 1, stats
        out_b, acc_b = accepted(b, prompt)
        assert out_b == expected  # still lossless
        # A drafted from the prompt alone; B also from A's response.
        assert acc_b > acc_a + 0.5 * len(expected[0]), (acc_a, acc_b, len(expected[0]))

        # The hub goes away: B keeps serving (and drafting from its local cache).
        ray.kill(ray.get_actor(hub, namespace="vllm-spec-plugins"), no_restart=True)
        out_c, acc_c = accepted(b, prompt)
        assert out_c == expected and acc_c > 0
        stats = flush(b)
        assert stats["sync_errors"] >= 1
    finally:
        del b
        gc.collect()


def test_bad_sharing_settings_fail_at_startup_naming_the_field():
    from vllm_spec_plugins.integration import speculative_config

    with pytest.raises(ValueError, match="spec_plugins_sharing.interval_s"):
        make_llm(speculative_config=speculative_config(4),
                 additional_config={"spec_plugins": {"method": "suffix_tree"},
                                    "spec_plugins_sharing": {"interval_s": -1}})
