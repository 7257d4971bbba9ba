"""Lossy scorers on the real vLLM CPU engine (SmolLM2-135M, float32).

The judge tests use two heads: one that accepts every draft token (so what
the scorer changes is certain and visible), and one the project's own
``train-judge`` made (smoke-sized; about loading and running a real head,
not its quality: that is the benchmark's).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")
from vllm import SamplingParams  # noqa: E402

from engine_utils import MAX_TOKENS, make_llm, model_path  # noqa: E402

pytestmark = pytest.mark.engine
K = 8


def greedy(lossy=None) -> SamplingParams:
    extra = None if lossy is None else {"spec_lossy": lossy}
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=extra)


def _target():
    from transformers import AutoConfig

    from vllm_spec_plugins.scorers.judge import JudgeTarget

    hf = AutoConfig.from_pretrained(model_path())
    return JudgeTarget("smollm2-135m", hf.architectures[0], hf.hidden_size, hf.vocab_size,
                       hf.num_hidden_layers)


def _head(tmp, bias: float, target=None) -> str:
    from vllm_spec_plugins.scorers.judge import LOGIT_FEATURES, JudgeHead, save_head

    t = target or _target()
    n = 2 * t.hidden_size + len(LOGIT_FEATURES)
    save_head(JudgeHead(torch.zeros(n), bias, torch.zeros(n), torch.ones(n), 0.5, t), tmp)
    return str(tmp)


@pytest.fixture(scope="module")
def accept_all_head(tmp_path_factory):
    return _head(tmp_path_factory.mktemp("heads") / "accept_all", bias=20.0)


def scorer_state(llm) -> dict:
    from vllm_spec_plugins.integration import scorer_snapshot

    (snap,) = llm.collective_rpc(scorer_snapshot)
    return snap


def _engine(scorer: dict, method: dict | None = None, k: int = K):
    from vllm_spec_plugins.engine_config import SCORER_KEY, speculative_config

    if method is None:
        spec = speculative_config(k)
        extra = {"spec_plugins": {"method": "suffix_tree"}}
    else:
        spec, extra = method, {}
    extra[SCORER_KEY] = scorer
    return make_llm(speculative_config=spec, additional_config=extra)


def _ids(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


# ----------------------------------------------------------------------------- judge
@pytest.fixture(scope="module")
def judge_llm(accept_all_head):
    engine = _engine({"name": "judge", "head": accept_all_head, "min_target_prob": 0})
    yield engine
    del engine


def test_mixed_batch_opted_out_requests_stay_identical(judge_llm, baseline_outputs):
    prompts, expected = baseline_outputs
    prompts = prompts[:6]
    params = [greedy(False) if i % 2 else greedy() for i in range(len(prompts))]
    before = scorer_state(judge_llm)
    outs = _ids(judge_llm.generate(prompts, params, use_tqdm=False))
    after = scorer_state(judge_llm)
    for i, (p, got) in enumerate(zip(prompts, outs)):
        if i % 2:
            assert got == expected[p], f"opted-out request {i} changed"
    # the lossy half really was scored lossily: the head accepted tokens the
    # standard rule rejected, and some outputs differ from the target's own
    assert after["scorer_accepted"] > before["scorer_accepted"]
    assert after["lossless_rows"] > before["lossless_rows"]
    assert any(outs[i] != expected[prompts[i]] for i in range(0, len(prompts), 2))
    lossy_ids = [rid for rid, r in after["per_request"].items() if r["lossy"]]
    assert lossy_ids and all(after["per_request"][r]["scorer_accepted"] >= 0 for r in lossy_ids)


def test_lossy_scorer_accepts_at_least_what_standard_verification_accepts(judge_llm,
                                                                           baseline_outputs):
    prompts, _ = baseline_outputs
    before = scorer_state(judge_llm)
    judge_llm.generate(prompts[:4], greedy(), use_tqdm=False)
    after = scorer_state(judge_llm)
    vllm_rule = after["vllm_rule_accepted"] - before["vllm_rule_accepted"]
    relaxed = after["relaxed_accepted"] - before["relaxed_accepted"]
    # on the same drafts, step by step: never fewer, and here (a head that
    # accepts everything) strictly more
    assert relaxed > vllm_rule
    assert after["errors"] == 0


def _break_scorer(worker, n: int) -> int:
    """For collective_rpc: the scorer's next ``n`` calls raise."""
    rt = worker.model_runner.__dict__["_vsp_scorer"]
    real = rt.scorer.acceptable
    left = [n]

    def failing(batch):
        if left[0] > 0:
            left[0] -= 1
            raise RuntimeError("injected scorer failure")
        return real(batch)

    rt.scorer.acceptable = failing
    return n


def test_a_failing_scorer_costs_only_the_relaxation(judge_llm, baseline_outputs):
    prompts, expected = baseline_outputs
    judge_llm.collective_rpc(_break_scorer, args=(2,))
    before = scorer_state(judge_llm)
    outs = judge_llm.generate(prompts[:2], greedy(), use_tqdm=False)
    after = scorer_state(judge_llm)
    assert after["errors"] - before["errors"] == 2
    assert after["enabled"], "two failures in a row must not switch it off"
    assert all(len(o.outputs[0].token_ids) == MAX_TOKENS or o.outputs[0].finish_reason == "stop"
               for o in outs)


# ----------------------------------------------------------------------------- standard
def test_the_default_scorer_is_token_identical_to_no_scorer(baseline_outputs):
    prompts, expected = baseline_outputs
    llm = _engine({"name": "standard"})
    try:
        outs = _ids(llm.generate(prompts, greedy(), use_tqdm=False))
        assert outs == [expected[p] for p in prompts]
        assert scorer_state(llm) is None  # nothing installed for the lossless rule
    finally:
        del llm


# ----------------------------------------------------------------------------- reflective
def test_reflective_mixed_batch_and_its_counters(baseline_outputs):
    prompts, expected = baseline_outputs
    llm = _engine({"name": "reflective"}, k=16)
    try:
        prompts = prompts[:6]
        params = [greedy(False) if i % 2 else greedy() for i in range(len(prompts))]
        outs = _ids(llm.generate(prompts, params, use_tqdm=False))
        for i in range(1, len(prompts), 2):
            assert outs[i] == expected[prompts[i]], f"opted-out request {i} changed"
        snap = scorer_state(llm)
        assert snap["errors"] == 0 and snap["lossy_rows"] > 0 and snap["lossless_rows"] > 0
        assert snap["scorer"]["probe_tokens"] > 0
        for o in outs:  # the probe and the copy never reach an output
            assert len(o) <= MAX_TOKENS
    finally:
        del llm


# ----------------------------------------------------------------------------- vLLM's own proposer
def test_judge_with_vllms_ngram(accept_all_head, baseline_outputs):
    prompts, expected = baseline_outputs
    ngram = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2,
             "prompt_lookup_max": 5}
    llm = _engine({"name": "judge", "head": accept_all_head, "requests": "opt_in",
                   "min_target_prob": 0}, ngram)
    try:
        # opt_in: requests without the flag stay lossless
        outs = _ids(llm.generate(prompts, greedy(), use_tqdm=False))
        assert outs == [expected[p] for p in prompts]
        before = scorer_state(llm)
        llm.generate(prompts[:4], greedy(True), use_tqdm=False)
        after = scorer_state(llm)
        assert after["lossy_rows"] > before["lossy_rows"]
        assert after["relaxed_accepted"] - before["relaxed_accepted"] >= \
            after["vllm_rule_accepted"] - before["vllm_rule_accepted"]
    finally:
        del llm


# ----------------------------------------------------------------------------- a trained head
def test_a_head_made_by_train_judge_loads_and_scores(smoke_judge, baseline_outputs):
    prompts, _ = baseline_outputs
    spec = json.loads((smoke_judge / "judge.json").read_text())
    assert "odd task numbers" in spec["training"]["data"]
    llm = _engine({"name": "judge", "head": str(smoke_judge)})
    try:
        llm.generate(prompts[:4], greedy(), use_tqdm=False)
        snap = scorer_state(llm)
        assert snap["errors"] == 0 and snap["lossy_rows"] > 0
        assert snap["relaxed_accepted"] >= snap["vllm_rule_accepted"]
        assert snap["scorer"]["threshold"] == pytest.approx(spec["threshold"])
    finally:
        del llm


# ----------------------------------------------------------------------------- startup errors
def _fails_at_startup(scorer: dict, match: str, method: dict | None = None, k: int = K):
    with pytest.raises(ValueError, match=match):
        _engine(scorer, method, k)


def test_bad_heads_and_settings_fail_at_startup_naming_the_field(tmp_path, accept_all_head):
    from vllm_spec_plugins.scorers.judge import JudgeTarget

    key = r"spec_plugins_scorer"
    _fails_at_startup({"name": "judge", "head": str(tmp_path / "missing")},
                      rf"{key}\.head: no judge head")
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "judge.json").write_text("{")
    _fails_at_startup({"name": "judge", "head": str(corrupt)}, rf"{key}\.head: .*corrupt")
    t = _target()
    other = _head(tmp_path / "other", 1.0, JudgeTarget("qwen2.5-coder-1.5b", t.architecture, 1536,
                                                       t.vocab_size, t.num_hidden_layers))
    _fails_at_startup({"name": "judge", "head": other},
                      r"trained for 'qwen2\.5-coder-1\.5b'.*hidden_size: head 1536, target 576")
    _fails_at_startup({"name": "judge", "head": accept_all_head, "threshold": 1.5},
                      rf"{key}\.threshold")
    _fails_at_startup({"name": "reflective", "fusion_weight": -1}, rf"{key}\.fusion_weight")
    _fails_at_startup({"name": "reflective"}, rf"{key}\.probe: .*num_speculative_tokens", k=4)
    ngram = {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 2,
             "prompt_lookup_max": 5}
    _fails_at_startup({"name": "reflective"}, rf"{key}\.name: 'reflective' extends", ngram)
    from vllm_spec_plugins.engine_config import SCORER_KEY

    with pytest.raises(ValueError, match=rf"{key}\.name: .*speculative decoding is off"):
        make_llm(additional_config={SCORER_KEY: {"name": "judge", "head": accept_all_head}})
