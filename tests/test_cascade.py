"""The cascade proposer without an engine: n-gram lookup, settings errors,
and the vertical/horizontal cascade on a real small model (SmolLM2-135M cut
to a few layers, through transformers; no vLLM)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_spec_plugins.config import CascadeConfig
from vllm_spec_plugins.engine_config import PluginConfigError
from vllm_spec_plugins.proposers.base import Proposer, ScoredDraft
from vllm_spec_plugins.proposers.prompt_lookup import lookup
from vllm_spec_plugins.registry import resolve

LAYERS = 4


# ------------------------------------------------------------ n-gram lookup
def test_lookup_copies_after_the_latest_longest_match():
    ctx = np.array([1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3], np.int32)
    toks, n = lookup(ctx, 3, 1, 3)
    assert n == 2 and toks.tolist() == [7, 8, 5]  # "2 3" last seen before "7 8 5"
    toks, n = lookup(ctx, 3, 3, 3)
    assert n == 0 and toks.tolist() == []  # "5 2 3" occurs nowhere earlier
    assert lookup(np.array([4, 4], np.int32), 2, 1, 2)[0].tolist() == [4]


# ------------------------------------------------------------ settings
def _resolve(levels):
    return resolve({"method": "cascade", "levels": levels})


def test_bad_levels_fail_naming_the_field():
    with pytest.raises(PluginConfigError, match=r"levels: .*below a model-free level"):
        _resolve([{"type": "suffix_tree"}, {"type": "draft_model", "model": "smollm2-135m"}])
    with pytest.raises(PluginConfigError, match=r"levels: .*needs at least one draft_model"):
        _resolve([{"type": "suffix_tree"}])
    with pytest.raises(PluginConfigError, match=r"levels\.0\.draft_model\.passes"):
        _resolve([{"type": "draft_model", "model": "smollm2-135m", "passes": 0}])


def _check_here(levels):
    from vllm_spec_plugins.integration.state_files import check_draft_models

    check_draft_models(_resolve(levels)[2])


def test_a_missing_draft_model_fails_at_startup_naming_the_field(monkeypatch):
    # Checked where the engine runs (vLLM startup, the drafter), not when a
    # Ray recipe is written for another machine.
    with pytest.MonkeyPatch.context() as mp:  # an empty model cache: nothing fetched
        mp.setenv("VSP_MODEL_CACHE", "/nonexistent-model-cache")
        with pytest.raises(PluginConfigError, match=r"levels\.0\.model: model 'smollm2-135m' is "
                                                    r"not fetched yet: run `vllm-spec-plugins "
                                                    r"models fetch smollm2-135m`"):
            _check_here([{"type": "draft_model", "model": "smollm2-135m"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PluginConfigError, match=r"levels\.0\.model: '/no/such/dir' is neither"):
        _check_here([{"type": "draft_model", "model": "/no/such/dir"}])
    with pytest.raises(PluginConfigError, match=r"HF_HUB_OFFLINE is set"):
        _check_here([{"type": "draft_model", "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    _check_here([{"type": "draft_model", "model": "Qwen/Qwen2.5-Coder-0.5B-Instruct"}])


def test_bad_level_settings_fail_naming_the_field():
    with pytest.raises(PluginConfigError, match=r"levels\.1\.ngram\.max_n: .*>= min_n"):
        _resolve([{"type": "draft_model", "model": "smollm2-135m"},
                  {"type": "ngram", "min_n": 4, "max_n": 2}])
    with pytest.raises(PluginConfigError, match=r"levels\.1: .*tag 'suffix_trie'"):
        _resolve([{"type": "draft_model", "model": "smollm2-135m"}, {"type": "suffix_trie"}])


# ------------------------------------------------------------ on a real model
@pytest.fixture(scope="module")
def reference():
    from vllm_spec_plugins.models import ensure_model
    from vllm_spec_plugins.proposers.causal_lm import CausalLMDrafter

    # float16 packing: the same tokens as float32 and, unlike int8 (activations
    # quantized per call), the same in a batch as alone, so drafts can be
    # compared token for token
    return CausalLMDrafter(str(ensure_model("smollm2-135m", progress=False)), num_layers=LAYERS,
                           cpu_packing="float16")


def greedy(ref, ctx, n):
    st = ref.new_state()
    seq = np.asarray(ctx, np.int64)
    out = []
    try:
        for _ in range(n):
            ids, _ = ref.predict(st, seq, 1)
            out.append(int(ids[-1]))
            seq = np.append(seq, ids[-1])
    finally:
        ref.release(st)
    return out


def cascade(passes, lower=({"type": "suffix_tree"}, {"type": "ngram"}), k=8, **model):
    from vllm_spec_plugins.proposers.cascade import CascadeProposer

    cfg = CascadeConfig(levels=[{"type": "draft_model", "model": "smollm2-135m",
                                 "num_layers": LAYERS, "passes": passes,
                                 "cpu_packing": "float16", **model}, *lower])
    return CascadeProposer(cfg, k)


PROMPT = np.array([1, 504, 3100, 314, 253, 1345, 28, 1675, 2500, 30] * 3, np.int32)


def run_steps(p, ref, steps=5, k=8, check_greedy=True):
    """Draft, then deliver tokens as a target would: the first 2 drafted
    tokens and a different one (a rejection), so the caches must roll back."""
    st = p.start_request("r", PROMPT)
    ctx = PROMPT.copy()
    drafts = []
    for _ in range(steps):
        d = p.propose_scored_batch([(st, ctx, k)])[0]
        drafts.append(d)
        if check_greedy:
            assert d.tokens == greedy(ref, ctx, k)
        assert len(d.tokens) == len(d.probs) and all(0.0 < x <= 1.0 for x in d.probs)
        keep = d.tokens[:2]
        nxt = d.tokens[len(keep)] if len(d.tokens) > len(keep) else 0
        new = np.array(keep + [(nxt + 1) % 49152], np.int32)  # not the drafted one
        p.on_tokens(st, new)
        ctx = np.concatenate([ctx, new])
    p.finish_request(st)
    return drafts


def test_vertical_cascade_drafts_exactly_the_models_greedy_tokens(reference):
    """With a pass per position the model checks every token: cheap tokens
    are kept only where the model would have chosen them, so the draft is the
    model's own greedy continuation, however the cheap levels guessed."""
    p = cascade(passes=8)
    run_steps(p, reference)
    stats = p.stats
    model = stats["levels"]["draft_model"]
    # fewer forward passes than tokens: some passes took several cheap tokens
    drafted = sum(v["drafted"] for v in stats["sources"].values())
    assert model["passes"] <= 5 * 8 and drafted > 0
    # at finish the request's cache is kept only for prefix reuse
    donors = p.models[0].lm._donors
    assert model["cached_tokens"] == 0 and len(donors) == 1
    assert model["kept_tokens"] == sum(len(d.tokens) for d in donors.values()) > 0
    # every scored source is the model's own or a cheap token it agreed with
    assert all(s == "draft_model" or s.endswith(">draft_model") for s in stats["sources"])
    # the same counts, per source and position, for the server's /metrics
    counters = p.prometheus_counters()
    drafted = {(lab["source"], lab["position"]): v for name, _, lab, v in counters
               if name == "vsp_cascade_drafted_tokens_total"}
    assert sum(drafted.values()) == sum(v["drafted"] for v in stats["sources"].values())
    assert ("draft_model", "1") in drafted


def test_horizontal_cascade_fills_later_positions_from_cheaper_levels(reference):
    p = cascade(passes=1)
    drafts = run_steps(p, reference, check_greedy=False)
    st = p.start_request("h", PROMPT)
    d = p.propose_scored_batch([(st, PROMPT, 8)])[0]
    srcs = st.last[1]
    # one pass: the model's token(s) first, then unchecked suffix-tree/n-gram tokens
    assert srcs[0].endswith("draft_model")
    assert any(s in ("suffix_tree", "ngram") for s in srcs), srcs
    assert d.tokens[:1] == greedy(reference, PROMPT, 1)
    assert all(x.tokens for x in drafts)
    p.finish_request(st)


class FailingLevel(Proposer):
    def start_request(self, req_id, prompt):
        return None

    def on_tokens(self, state, new):
        pass

    def propose(self, state, context, max_tokens):
        raise RuntimeError("injected level failure")


def test_a_failing_level_leaves_the_others_drafting(reference):
    p = cascade(passes=8)
    p.lower.insert(0, ("failing", FailingLevel()))
    p.lower_errors["failing"] = 0
    run_steps(p, reference, steps=2)  # still the model's exact greedy drafts
    assert p.stats["levels"]["failing"]["errors"] > 0
    # the model level failing: its rows fall back to the cheap proposal, unchecked
    q = cascade(passes=8)
    m = q.models[0]

    def boom(*a, **k):
        raise RuntimeError("injected model failure")

    m.timed_predict = boom  # (states, seqs, n_outs)
    st = q.start_request("f", PROMPT)
    d = q.propose_scored_batch([(st, PROMPT, 8)])[0]
    assert d.tokens and all(s in ("suffix_tree", "ngram") for s in st.last[1])
    assert q.stats["levels"]["draft_model"]["errors"] > 0


def test_draft_model_cache_is_bounded_and_still_exact(reference):
    p = cascade(passes=8, max_cached_tokens=256)
    prompt = np.tile(PROMPT, 3)
    states = [p.start_request(f"r{i}", prompt) for i in range(4)]  # 4 x 90 prompt tokens
    lm = p.models[0].lm
    expected = greedy(reference, prompt, 8)
    for st in states + states:  # the second round re-reads evicted contexts
        d = p.propose_scored_batch([(st, prompt, 8)])[0]
        assert d.tokens == expected
        assert lm.stats["cached_tokens"] + lm.stats["kept_tokens"] <= 256
    assert lm.stats["evictions"] > 0
    for st in states:
        p.finish_request(st)
    assert lm.stats["cached_tokens"] == 0 and lm.stats["kept_tokens"] <= 256


def test_auto_passes_stop_when_a_pass_costs_more_than_it_gains(reference):
    p = cascade(passes="auto", prompt_read="at_start")  # no read to weigh: passes only
    m = p.models[0]

    class Throughput:
        def __init__(self, tps):
            self.tps = tps

        def tokens_per_second(self):
            return self.tps

    p.arm_explore = 0.0  # no trusting of the cheap proposal by exploration here
    st = p.start_request("a", PROMPT)
    p.set_step_cost(Throughput(1e6))  # a second of step time is worth a million tokens
    m.pass_seconds = 1.0
    p.propose_scored_batch([(st, PROMPT, 8)])
    assert m.passes == 0  # no pass pays: the cheap proposal goes unchecked
    p.set_step_cost(Throughput(1e-3))  # a target so slow that any pass pays
    before = m.passes
    d = p.propose_scored_batch([(st, PROMPT, 8)])[0]
    assert m.passes - before >= 2 and d.tokens == greedy(reference, PROMPT, 8)
    # the token a pass adds must also be worth verifying: at a price of a
    # whole token (the budget's, for this batch) no later pass pays
    before = m.passes
    p.propose_scored_batch([(st, PROMPT, 8)], price=1.0)
    assert m.passes - before == 1
    p.finish_request(st)


def test_scored_draft_has_a_stratum_per_source(reference):
    p = cascade(passes=8)
    st = p.start_request("s", PROMPT)
    d = p.propose_scored_batch([(st, PROMPT, 8)])[0]
    assert isinstance(d, ScoredDraft) and d.stratum in (0, 1)
    p.finish_request(st)


def test_batched_pass_equals_row_by_row(reference):
    """One forward for several rows (left-padded caches, right-padded new
    tokens) gives each row what its own forward gives, and leaves each row's
    cache holding exactly its sequence."""
    from vllm_spec_plugins.models import ensure_model
    from vllm_spec_plugins.proposers.causal_lm import CausalLMDrafter

    lm = CausalLMDrafter(str(ensure_model("smollm2-135m", progress=False)), num_layers=LAYERS,
                         cpu_packing="float16")
    rng = np.random.default_rng(0)
    ctxs = [rng.integers(10, 4000, size=n).astype(np.int64) for n in (12, 40, 25)]
    states = [lm.new_state() for _ in ctxs]
    for st, c in zip(states, ctxs):
        lm.predict(st, c, 1)  # cached
    # new sequences: one extended by 5, one rolled back 3 then extended by 2, one by 1
    seqs = [np.append(ctxs[0], [5, 6, 7, 8, 9]), np.append(ctxs[1][:-3], [11, 12]),
            np.append(ctxs[2], [13])]
    n_outs = [6, 3, 2]
    got = lm.predict_batch(states, seqs, n_outs)
    for st, q, n, (ids, p) in zip(states, seqs, n_outs, got):
        fresh = reference.new_state()
        ref_ids, ref_p = reference.predict(fresh, q, n)
        reference.release(fresh)
        assert ids.tolist() == ref_ids.tolist()
        assert np.allclose(p, ref_p, atol=1e-4)
        assert st.tokens.tolist() == q.tolist()
        assert st.cache.get_seq_length() == len(q)
    # and the caches go on giving exact answers
    nxt = [np.append(q, [3]) for q in seqs]
    for st, q, (ids, _) in zip(states, nxt, lm.predict_batch(states, nxt, [1, 1, 1])):
        fresh = reference.new_state()
        assert ids.tolist() == reference.predict(fresh, q, 1)[0].tolist()
        reference.release(fresh)
    assert lm.stats["batched_forwards"] == 2


def test_batch_of_rows_drafts_each_rows_greedy_tokens(reference):
    p = cascade(passes=8)
    prompts = [PROMPT, np.tile(PROMPT[:7], 4), PROMPT[:12]]
    states = [p.start_request(f"b{i}", q) for i, q in enumerate(prompts)]
    drafts = p.propose_scored_batch([(st, q, 8) for st, q in zip(states, prompts)])
    for q, d in zip(prompts, drafts):
        assert d.tokens == greedy(reference, q, 8)
    assert p.models[0].lm.stats.get("batched_forwards", 0) > 0
    for st in states:
        p.finish_request(st)


def test_horizontal_only_levels_do_not_check_the_proposal(reference):
    p = cascade(passes=2, vertical=False)
    st = p.start_request("h", PROMPT)
    d = p.propose_scored_batch([(st, PROMPT, 8)])[0]
    srcs = st.last[1]
    assert srcs[:2] == ["draft_model", "draft_model"] and d.tokens[:2] == greedy(reference, PROMPT, 2)
    assert all(s in ("suffix_tree", "ngram") for s in srcs[2:])
    assert p.models[0].passes == 2
    p.finish_request(st)


def test_check_or_trust_learns_where_the_models_check_does_not_pay(reference):
    """With the model's pass priced far above what it adds (a slow pass, a
    fast engine), rows with a cheap proposal end up sent unchecked; with it
    cheap, they are checked. Both arms stay measured (exploration)."""
    class Throughput:
        def __init__(self, tps):
            self.tps = tps

        def tokens_per_second(self):
            return self.tps

    p = cascade(passes="auto")
    m = p.models[0]
    p.set_step_cost(Throughput(1e6))
    drafts = run_steps(p, reference, steps=12, check_greedy=False)
    m.pass_seconds = 10.0  # keep the pass dear (timed_predict updates it)
    arms = p.stats["check_or_trust"]
    assert arms and all(sum(v["rows"].values()) > 0 for v in arms.values())
    p._arms = {}
    p.arm_explore = 0.0
    assert {p._choose_arm(0, m, key, 0) for key in p.arm_stats} == {"trust"}
    # a free pass: the arm with more accepted tokens per row wins
    m.pass_seconds = 0.0
    for key, a in p.arm_stats.items():
        prior = (a.accepted["check"] + a.accepted["trust"] + 1.0) / (
            a.rows["check"] + a.rows["trust"] + 1.0)
        bonus = p._level_stats(m).rate(0)  # the check's prior: one model token more
        better = ("trust" if a.mean("trust", prior) > a.mean("check", prior + bonus)
                  else "check")
        assert p._choose_arm(0, m, key, 0) == better
    # rows with a proposal drafted (checked or not); a row with nothing to
    # check gets no model pass at this price (see the rent-or-buy test)
    assert any(d.tokens for d in drafts)


def test_cpu_packing_keeps_the_models_greedy_choices(reference):
    """float16-packed linear layers choose the tokens plain
    float32 chooses, at every position of a long sequence but near-ties;
    int8 runs and still mostly agrees. Packing is reported."""
    from vllm_spec_plugins.models import ensure_model
    from vllm_spec_plugins.proposers.causal_lm import CausalLMDrafter
    from vllm_spec_plugins.proposers.packed_linear import pack_linears

    path = str(ensure_model("smollm2-135m", progress=False))
    plain = CausalLMDrafter(path, num_layers=LAYERS)
    int8 = CausalLMDrafter(path, num_layers=LAYERS, cpu_packing="int8")
    assert (plain.packing, reference.packing, int8.packing) == ("none", "float16", "int8")
    import torch

    assert not any(type(m) is torch.nn.Linear for m in reference.model.modules())
    assert any(type(m) is torch.nn.Linear for m in plain.model.modules())
    seq = np.tile(PROMPT, 6).astype(np.int64)
    seq[::7] = np.arange(len(seq[::7])) * 37 + 100  # not only copies
    n = len(seq) - 1
    ids = {}
    for name, lm in (("plain", plain), ("float16", reference), ("int8", int8)):
        st = lm.new_state()
        ids[name], probs = lm.predict(st, seq, n)
        lm.release(st)
        assert np.all((probs > 0) & (probs <= 1.0))
    assert np.mean(ids["float16"] == ids["plain"]) >= 0.97
    assert np.mean(ids["int8"] == ids["plain"]) >= 0.6
    with pytest.raises(ValueError, match="unknown packing"):
        pack_linears(plain.model, "int4")


def test_a_finished_requests_cache_serves_the_next_prompt_that_starts_with_it(reference):
    """The next turn of a chat starts with the last turn's tokens: its
    prompt copies them from the finished request's cache instead of reading
    them again, and predicts what a fresh read predicts. Kept caches are
    bounded in number and give way to live requests under the token bound;
    an aborted request's cache is not kept."""
    from vllm_spec_plugins.models import ensure_model
    from vllm_spec_plugins.proposers import causal_lm
    from vllm_spec_plugins.proposers.causal_lm import CausalLMDrafter

    lm = CausalLMDrafter(str(ensure_model("smollm2-135m", progress=False)), num_layers=LAYERS,
                         cpu_packing="float16", max_cached_tokens=400)
    turn1 = np.tile(PROMPT, 2).astype(np.int64)
    st = lm.new_state()
    lm.predict(st, turn1, 1)
    lm.release(st, keep=True)
    turn2 = np.concatenate([turn1, [7, 8, 9, 10], PROMPT[:12]]).astype(np.int64)
    st2 = lm.new_state()
    assert lm.reuse_prefix(st2, turn2) == len(turn1)
    ids, probs = lm.predict(st2, turn2, 5)
    fresh = reference.new_state()
    ref_ids, ref_probs = reference.predict(fresh, turn2, 5)
    reference.release(fresh)
    assert ids.tolist() == ref_ids.tolist() and np.allclose(probs, ref_probs, atol=1e-4)
    assert lm.stats["reused_prefix_tokens"] == len(turn1)
    # an unrelated prompt copies nothing; an aborted request's cache is not kept
    other = lm.new_state()
    assert lm.reuse_prefix(other, np.arange(100, 160, dtype=np.int64)) == 0
    lm.predict(other, np.arange(100, 160, dtype=np.int64), 1)
    lm.release(other, keep=False)
    assert lm.reuse_prefix(lm.new_state(), np.arange(100, 160, dtype=np.int64)) == 0
    # bounded: at most MAX_DONORS kept, and live requests evict kept ones first
    for i in range(causal_lm.MAX_DONORS + 3):
        s = lm.new_state()
        lm.predict(s, np.arange(i * 50 + 200, i * 50 + 220, dtype=np.int64), 1)
        lm.release(s, keep=True)
    assert len(lm._donors) <= causal_lm.MAX_DONORS
    big = lm.new_state()
    lm.predict(big, np.tile(PROMPT, 12).astype(np.int64), 1)  # 360 of the 400 tokens
    assert lm.stats["cached_tokens"] + lm.stats["kept_tokens"] <= 400
    assert all(d.cache is not None for d in lm._donors.values())


def test_the_draft_model_reads_a_window_of_the_last_max_context_tokens(reference):
    """A long request is read from its last max_context tokens; the window
    keeps its start (the cache goes on) until it has grown to twice that,
    then starts again from the last max_context tokens. Each prediction is
    what the model predicts reading exactly the window."""
    from vllm_spec_plugins.models import ensure_model
    from vllm_spec_plugins.proposers.causal_lm import CausalLMDrafter

    W = 64
    lm = CausalLMDrafter(str(ensure_model("smollm2-135m", progress=False)), num_layers=LAYERS,
                         cpu_packing="float16", max_context=W)
    rng = np.random.default_rng(1)
    seq = rng.integers(10, 4000, size=300).astype(np.int64)

    def check(upto, n, offset):
        pending, before = lm.pending_tokens(st, seq[:upto], n), lm.stats["forward_tokens"]
        st_ids, st_p = lm.predict(st, seq[:upto], n)
        assert lm.stats["forward_tokens"] - before == pending  # what it said it would run
        assert st.offset == offset and len(st.tokens) == upto - offset
        fresh = reference.new_state()
        ref_ids, ref_p = reference.predict(fresh, seq[offset:upto], n)
        reference.release(fresh)
        assert st_ids.tolist() == ref_ids.tolist() and np.allclose(st_p, ref_p, atol=1e-4)

    st = lm.new_state()
    check(100, 1, 100 - W)          # first read: the last W tokens
    forwards = lm.stats["forward_tokens"]
    check(150, 5, 100 - W)          # same window start, only the new tokens run
    assert lm.stats["forward_tokens"] - forwards == 50
    check(140, 3, 100 - W)          # rolled back (a rejected draft)
    check(100 + W, 2, 100 - W)      # grown to exactly 2W: the same window
    check(230, 2, 230 - W)          # past 2W: read again from the last W
    # a batch of rows windows each row the same way
    st2 = lm.new_state()
    lm.predict(st2, seq[:50], 1)
    (a_ids, _), (b_ids, _) = lm.predict_batch([st, st2], [seq[:235], seq[:58]], [2, 2])
    assert st.offset == 230 - W and st2.offset == 0
    fresh = reference.new_state()
    assert a_ids.tolist() == reference.predict(fresh, seq[230 - W:235], 2)[0].tolist()
    reference.release(fresh)
    # a prompt longer than the window copies no finished request's prefix
    assert lm.reuse_prefix(lm.new_state(), seq[:W + 1]) == 0


def test_the_prompt_is_read_when_a_pass_first_needs_it(reference):
    """prompt_read "when_needed": starting a request runs no forward; a row
    whose cheap proposal would need the prompt read first is sent unchecked
    (a read is no first try), and one with nothing to check reads it and
    drafts the model's greedy tokens. "at_start" reads it at once. A measured
    read time is charged to the check: enough pending tokens turn an arm
    that pays into one that does not."""
    from vllm_spec_plugins.proposers.cascade import ArmStats
    from vllm_spec_plugins.proposers.causal_lm import READ_MIN_TOKENS

    p = cascade(passes="auto")
    lm = p.models[0].lm
    assert lm.read_seconds_per_token is None
    p.warmup()
    assert lm.read_seconds_per_token and lm.read_seconds_per_token > 0
    before = lm.stats["forwards"]
    st = p.start_request("w", PROMPT)
    assert lm.stats["forwards"] == before and st.lm[0].cache is None
    # PROMPT repeats: the suffix tree proposes a copy; checking it would read 30 tokens
    long_prompt = np.tile(PROMPT, 2)
    st2 = p.start_request("w2", long_prompt)
    d = p.propose_scored_batch([(st2, long_prompt, 8)])[0]
    assert d.tokens and set(st2.last[1]) <= {"suffix_tree", "ngram"}
    assert lm.stats["forwards"] == before and st2.last[2][1] == "trust"
    # nothing to check (no earlier occurrence): the model reads and drafts
    fresh = np.arange(400, 440, dtype=np.int32)
    st3 = p.start_request("w3", fresh)
    d = p.propose_scored_batch([(st3, fresh, 4)])[0]
    assert d.tokens[:1] == greedy(reference, fresh, 1) and st3.last[1][0] == "draft_model"
    assert lm.stats["forward_tokens"] >= len(fresh)
    for s in (st, st2, st3):
        p.finish_request(s)
    eager = cascade(passes="auto", prompt_read="at_start")
    n0 = eager.models[0].lm.stats["forward_tokens"]
    s = eager.start_request("e", PROMPT)
    assert eager.models[0].lm.stats["forward_tokens"] - n0 == len(PROMPT)
    eager.finish_request(s)

    # the charge: an arm worth checking at no read is not worth it behind a long one
    class Throughput:
        def tokens_per_second(self):
            return 10.0

    p.set_step_cost(Throughput())
    m = p.models[0]
    m.pass_seconds, lm.read_seconds_per_token = 0.01, 0.01
    p.arm_stats[("suffix_tree", 4)] = a = ArmStats()
    a.rows.update(check=50, trust=50)
    a.accepted.update(check=200, trust=150)  # checking adds a token a row
    p.arm_explore, p._arms = 0.0, {}
    key = ("suffix_tree", 4)
    assert p._choose_arm(0, m, key, 10) == "check"
    assert p._choose_arm(0, m, key, READ_MIN_TOKENS + 20) == "trust"  # 0.2 s x 10 tok/s > 1


def test_a_read_is_bought_once_the_gain_forgone_covers_it(reference):
    """Rent or buy: a pass that must first read (a prompt, a catch-up) runs
    once the gain forgone without it, summed over the request's steps,
    covers the read's measured cost; then the sum starts again. A row with
    nothing to check and nothing to read gets the model's pass only while
    its token pays. Reads run alone in a batched pass and are not counted
    in the pass time."""
    from vllm_spec_plugins.proposers.cascade import ArmStats
    from vllm_spec_plugins.proposers.causal_lm import READ_MIN_TOKENS

    class Throughput:
        def tokens_per_second(self):
            return 10.0

    p = cascade(passes="auto")
    m, lm = p.models[0], p.models[0].lm
    p.set_step_cost(Throughput())
    m.pass_seconds, lm.read_seconds_per_token, p._price = 0.01, 0.0097, 0.0
    p.arm_explore = 0.0
    # the model's own token: prior acceptance 0.6, less 0.1 for the pass;
    # a read of 100 tokens past READ_MIN_TOKENS costs 100 x 0.0097 s x 10 tok/s
    credit = [0.0]
    pending = READ_MIN_TOKENS + 100
    bought = [p._own_pass_pays(m, pending, credit) for _ in range(25)]
    assert bought.index(True) == 19 and bought.count(True) == 1  # 20 x 0.5 >= 9.7
    assert abs(credit[0] - 5 * 0.5) < 1e-9
    assert p._own_pass_pays(m, 10, [0.0])  # no read: 0.5 > 0 pays
    m.pass_seconds = 1.0  # a pass worth 10 tokens: the model's token does not pay
    assert not p._own_pass_pays(m, 10, [0.0])
    credit = [0.0]
    assert not any(p._own_pass_pays(m, pending, credit) for _ in range(50)) and credit[0] == 0
    # a check that adds ~0.98 token a row over trusting the proposal: bought after 10 rows
    m.pass_seconds = 0.0
    p.arm_stats[("suffix_tree", 4)] = a = ArmStats()
    a.rows.update(check=100, trust=100)
    a.accepted.update(check=400, trust=300)
    credit, p._arms = [0.0], {}
    arms = [p._choose_arm(0, m, ("suffix_tree", 4), pending, credit) for _ in range(12)]
    assert arms.index("check") == 9 and arms.count("check") == 1

    # in a batched pass a long catch-up runs alone: the other row is not
    # padded to it, and its time stays out of the pass time
    p = cascade(passes="auto")
    m, lm = p.models[0], p.models[0].lm
    a_ctx, b_ctx = PROMPT.copy(), np.arange(600, 640, dtype=np.int64)
    sa, sb = p.start_request("a", a_ctx), p.start_request("b", b_ctx)
    m.timed_predict([sa.lm[0], sb.lm[0]], [a_ctx, b_ctx], [1, 1])  # both read from scratch
    sb_next = np.concatenate([b_ctx, np.arange(700, 700 + READ_MIN_TOKENS + 8)])
    a_next = np.concatenate([a_ctx, [5, 6]])
    reads, batched = lm.stats["reads"], lm.stats.get("batched_forwards", 0)
    t0 = lm.stats["forward_tokens"]
    out = m.timed_predict([sa.lm[0], sb.lm[0]], [a_next, sb_next], [1, 1])
    assert lm.stats["reads"] == reads + 1 and lm.stats.get("batched_forwards", 0) == batched
    assert lm.stats["forward_tokens"] - t0 == 2 + READ_MIN_TOKENS + 8
    assert [int(o[0][0]) for o in out] == [greedy(reference, a_next, 1)[0],
                                           greedy(reference, sb_next, 1)[0]]
    assert m.pass_seconds is not None
