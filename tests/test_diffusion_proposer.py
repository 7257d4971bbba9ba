"""DiffusionProposer without an engine (the session's untrained drafter):
draft shape and scoring, the pass gate, a failing pass, release."""

import numpy as np
import pytest

pytest.importorskip("torch")

from vllm_spec_plugins.config import DiffusionConfig  # noqa: E402
from vllm_spec_plugins.proposers.diffusion import DiffusionProposer  # noqa: E402


class FixedThroughput:
    """Stand-in for the engine's step-cost model: a fixed tokens/s."""

    def __init__(self, tps: float) -> None:
        self.tps = tps

    def tokens_per_second(self) -> float:
        return self.tps


@pytest.fixture
def proposer(untrained_drafter_cache):
    cfg = DiffusionConfig(drafter=str(untrained_drafter_cache / "smollm2-135m"))
    return DiffusionProposer(cfg, 6)


def test_drafts_are_scored_and_capped(proposer):
    ctx = np.arange(100, 140, dtype=np.int32)
    st = proposer.start_request("r", ctx)
    (d,) = proposer.propose_scored_batch([(st, ctx, 6)], price=0.1)
    assert 1 <= len(d.tokens) <= 6 and len(d.probs) == len(d.tokens)
    assert all(0 < p <= 1 for p in d.probs)
    # the next tokens score the draft: its first token, then a miss
    new = np.array([d.tokens[0], (d.tokens[0] + 1) % 49152] if len(d.tokens) > 1
                   else [d.tokens[0]], np.int32)
    proposer.on_tokens(st, new)
    s = proposer.stats
    assert s["drafted_per_position"][0] == 1 and s["accepted_per_position"][0] == 1
    assert s["passes"] == 1 and s["cached_tokens"] == len(ctx) - 1
    proposer.finish_request(st)
    assert proposer.stats["cached_tokens"] == 0


def test_adaptive_length_follows_acceptance(proposer):
    ctx = np.arange(200, 260, dtype=np.int32)
    st = proposer.start_request("r", ctx)
    for _ in range(6):  # every draft rejected at once
        (d,) = proposer.propose_scored_batch([(st, ctx, 6)])
        miss = np.array([(d.tokens[0] + 1) % 49152], np.int32)
        proposer.on_tokens(st, miss)
        ctx = np.concatenate([ctx, miss])
    (d,) = proposer.propose_scored_batch([(st, ctx, 6)])
    assert len(d.tokens) == proposer.config.min_length


def test_a_pass_that_does_not_pay_is_skipped(proposer):
    proposer.set_step_cost(FixedThroughput(1000.0))
    proposer.pass_seconds, proposer.pass_gain = 0.01, 0.5  # worth 10 tokens, gains 0.5
    ctx = np.arange(300, 340, dtype=np.int32)
    st = proposer.start_request("r", ctx)
    skipped = sum(not proposer.propose_scored_batch([(st, ctx, 6)])[0].tokens
                  for _ in range(50))
    # ~90% skipped (one would-be-skipped step in ten still runs)
    assert 30 <= skipped < 50
    assert proposer.stats["skipped_steps"] == skipped
    proposer.pass_gain = 20.0
    proposer.pass_seconds = 0.01
    assert proposer.propose_scored_batch([(st, ctx, 6)])[0].tokens


def test_a_failing_pass_drafts_nothing_and_is_counted(proposer, monkeypatch):
    ctx = np.arange(400, 440, dtype=np.int32)
    st = proposer.start_request("r", ctx)
    proposer.propose_scored_batch([(st, ctx, 6)])

    def boom(*a, **k):
        raise RuntimeError("injected")

    monkeypatch.setattr(proposer.runtime, "draft", boom)
    (d,) = proposer.propose_scored_batch([(st, ctx, 6)])
    assert d.tokens == [] and proposer.stats["errors"] == 1
    assert st.lm.kv is None  # read again next time
    monkeypatch.undo()
    (d,) = proposer.propose_scored_batch([(st, ctx, 6)])
    assert d.tokens


def test_stats_name_the_drafter(proposer):
    s = proposer.stats
    assert s["block_size"] == 10 and s["drafter_layers"] == 2
    assert s["dtype"] in ("float32", "bfloat16")
    assert proposer.made_for_target["hidden_size"] == 576
    names = {c[0] for c in proposer.prometheus_counters()}
    assert "vsp_diffusion_skipped_steps_total" in names
