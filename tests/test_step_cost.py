"""StepCostModel (plain Python): fitting step time vs verified tokens, pricing a draft token."""

from __future__ import annotations

import random

import numpy as np
import pytest

from vllm_spec_plugins.config import TokenRecyclingConfig
from vllm_spec_plugins.proposers.step_cost import StepCostModel
from vllm_spec_plugins.proposers.token_recycling import TokenRecyclingProposer


def feed(model, a, b, steps=200, rows=1, noise=0.0, out_per_row=1.5, seed=0):
    rng = random.Random(seed)
    for _ in range(steps):
        drafts = rng.randint(0, 8) * rows
        n = rows + drafts
        t = a + b * n
        t *= 1.0 + rng.uniform(-noise, noise)
        model.observe(n, rows, int(round(out_per_row * rows)), t)


def test_recovers_the_line_and_prices_by_the_marginal_rule():
    m = StepCostModel()
    feed(m, a=0.2, b=0.03, out_per_row=2.0)
    s = m.stats
    assert s["step_ms"] == pytest.approx(200, rel=1e-3)
    assert s["token_ms"] == pytest.approx(30, rel=1e-3)
    # price = b * E / T at the recent draft mix: rows 1, 2 tokens out per row,
    # ~4 drafts per row (uniform 0..8) -> 0.03 * 2 / (0.2 + 0.03 * 5)
    mean_drafts = m._sd / m._sr
    expect = 0.03 * 2.0 / (0.2 + 0.03 * (1 + mean_drafts))
    assert m.token_price(1) == pytest.approx(expect, rel=1e-6)


def test_price_rises_with_the_batch_and_is_clamped():
    m = StepCostModel()
    feed(m, a=0.2, b=0.03)
    p1, p4, p64 = m.token_price(1), m.token_price(4), m.token_price(64)
    assert p1 < p4 < p64 <= 0.95
    cheap = StepCostModel()
    feed(cheap, a=0.02, b=0.0)  # extra tokens free (memory-bound GPU)
    assert cheap.token_price(1) == cheap.min_price


def test_not_ready_without_enough_steps_or_spread():
    m = StepCostModel(min_steps=32)
    feed(m, a=0.2, b=0.03, steps=10)
    assert m.token_price(1) is None
    flat = StepCostModel()
    for _ in range(100):  # every step verifies the same number of tokens
        flat.observe(3, 1, 2, 0.25)
    assert flat.token_price(1) is None


def test_noisy_steps_give_no_price_until_the_error_is_small():
    noisy = StepCostModel(max_price_error=0.02)
    feed(noisy, a=0.2, b=0.01, steps=40, noise=0.9, seed=3)
    assert noisy.token_price(1) is None
    feed(noisy, a=0.2, b=0.01, steps=4000, noise=0.05, seed=4)
    assert noisy.token_price(1) is not None


def test_outliers_and_bad_values_are_dropped():
    m = StepCostModel()
    feed(m, a=0.2, b=0.03)
    before = m.token_price(1)
    assert not m.observe(5, 1, 2, 20.0)       # a pause, 4x+ the prediction
    assert not m.observe(5, 1, 2, float("nan"))
    assert not m.observe(0, 1, 2, 0.1)        # fewer tokens than rows
    assert not m.observe(5, 0, 2, 0.1)
    assert m.rejected == 4
    assert m.token_price(1) == pytest.approx(before)


def test_forgets_old_hardware():
    m = StepCostModel(half_life_steps=50)
    feed(m, a=0.2, b=0.05, steps=300)
    high = m.token_price(1)
    feed(m, a=0.2, b=0.005, steps=600, seed=1)
    assert m.token_price(1) < high / 3


def test_token_recycling_uses_the_measured_price_only_when_asked():
    m = StepCostModel()
    feed(m, a=0.2, b=0.03)
    measured = TokenRecyclingProposer(TokenRecyclingConfig(), 8)
    measured.set_step_cost(m)
    assert measured.draft_threshold(1) == pytest.approx(m.token_price(1))
    assert measured.draft_threshold(4) == pytest.approx(m.token_price(4))
    fixed = TokenRecyclingProposer(TokenRecyclingConfig(draft_price="fixed"), 8)
    fixed.set_step_cost(m)
    assert fixed.draft_threshold(1) == pytest.approx(0.1)
    # not measured yet: the configured threshold
    fresh = TokenRecyclingProposer(TokenRecyclingConfig(), 8)
    fresh.set_step_cost(StepCostModel())
    assert fresh.draft_threshold(1) == pytest.approx(0.1)


def test_a_higher_price_drafts_shorter_chains():
    cheap, dear = StepCostModel(), StepCostModel()
    feed(cheap, a=0.2, b=0.0005)
    feed(dear, a=0.2, b=0.05)
    lens = {}
    for name, model in (("cheap", cheap), ("dear", dear)):
        p = TokenRecyclingProposer(TokenRecyclingConfig(topk=2, tree_breadth=[1]), 8)
        # a chain 1 -> 2 -> 3 -> ... each step 0.8 likely
        for t in range(1, 10):
            p.matrix.update(np.array([t], np.int32), np.array([[t + 1, 0]], np.int32),
                            np.array([[0.8, 0.1]], np.float32))
        p.set_step_cost(model)
        lens[name] = len(p.propose(p.start_request("r", np.array([1], np.int32)),
                                   np.array([1], np.int32), 8))
    assert lens["cheap"] > lens["dear"] >= 1


def test_rows_and_drafted_tokens_get_separate_slopes():
    # A row costs 12 ms (sampling, bookkeeping, its query token), a drafted
    # token 2 ms: the fit must tell them apart when both vary.
    rng = random.Random(5)
    m = StepCostModel()
    for _ in range(400):
        rows = rng.randint(4, 32)
        drafts = rng.randint(0, 3 * rows)
        m.observe(rows + drafts, rows, rows, 0.05 + 0.012 * rows + 0.002 * drafts)
    s = m.stats
    assert s["row_ms"] == pytest.approx(12, rel=1e-3)
    assert s["token_ms"] == pytest.approx(2, rel=1e-3)
    assert s["step_ms"] == pytest.approx(50, rel=1e-3)


def test_a_shrinking_batch_without_drafts_is_not_charged_to_drafts():
    # The failure this fit fixes: a method that drafts almost nothing while
    # requests finish (rows 32 -> 1). One slope over verified tokens saw only
    # the per-row cost and priced every draft near 0.9 at batch 32.
    m = StepCostModel()
    row_s, draft_s = 0.012, 0.002
    for _ in range(4):
        for rows in range(32, 0, -1):
            m.observe(rows, rows, rows, 0.05 + row_s * rows)
    assert m.token_price(32) is None           # drafts never varied: unknown,
    assert m.needs_exploration(32)             # and only drafts can tell
    rng = random.Random(2)
    for i in range(200):                       # some steps now carry drafts
        rows = 32 - i % 32
        drafts = rng.randint(0, 2 * rows) if i % 4 == 0 else 0
        m.observe(rows + drafts, rows, rows, 0.05 + row_s * rows + draft_s * drafts)
    price = m.token_price(32)
    assert price is not None and not m.needs_exploration(32)
    drafts_per_row = m._sd / m._sr
    expect = draft_s * 32 / (0.05 + row_s * 32 + draft_s * 32 * drafts_per_row)
    assert price == pytest.approx(expect, rel=0.02)
    one_slope = row_s * 32 / (0.05 + row_s * 32)  # what the old fit charged
    assert price < one_slope / 4


def test_not_exploring_before_enough_steps():
    m = StepCostModel(min_steps=32)
    for _ in range(10):
        m.observe(8, 8, 8, 0.2)
    assert not m.needs_exploration(8)


def test_tokens_per_second_follows_the_last_few_steps():
    """What a second is worth tracks the current traffic: after 300 steps at
    20 tokens/s, 80 steps (5 half-lives) at 5 tokens/s bring it near 5,
    while the cost fit keeps its longer memory."""
    m = StepCostModel()
    assert m.tokens_per_second() is None
    for i in range(300):
        m.observe(tokens=4 + i % 5, rows=1, output_tokens=4, seconds=0.2)  # 20 tok/s
    assert abs(m.tokens_per_second() - 20.0) < 1e-6
    for i in range(80):
        m.observe(tokens=2 + i % 3, rows=1, output_tokens=1, seconds=0.2)  # 5 tok/s
    assert 5.0 < m.tokens_per_second() < 6.0
    assert m._out / m._sy > 10.0  # the fit's own averages still remember the first 300
