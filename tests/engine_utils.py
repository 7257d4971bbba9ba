"""Shared helpers for tests that run the real vLLM CPU engine (float32)."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(fn)

MAX_TOKENS = 64


def model_path() -> str:
    from vllm_spec_plugins.models import ensure_model

    return str(ensure_model("smollm2-135m", progress=False))


def make_llm(**kwargs):
    from vllm import LLM

    settings = dict(dtype="float32", max_model_len=4096, seed=0,
                    kv_cache_memory_bytes=1 << 30, disable_log_stats=False,
                    enforce_eager=True)
    settings.update(kwargs)
    return LLM(model=model_path(), **settings)


def plugin_llm(method: str = "suffix_tree", k: int = 8, **settings):
    from vllm_spec_plugins.engine_config import speculative_config

    return make_llm(speculative_config=speculative_config(k),
                    additional_config={"spec_plugins": {"method": method, **settings}})


def spec_counters(llm) -> dict[str, object]:
    out: dict[str, object] = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_"):
            key = m.name.removeprefix("vllm:spec_decode_num_")
            out[key] = list(m.values) if hasattr(m, "values") else float(m.value)
    return out


def delta(after: dict, before: dict, key: str) -> float:
    return float(after.get(key, 0)) - float(before.get(key, 0))


def drafter_state(llm) -> dict:
    from vllm_spec_plugins.integration import drafter_snapshot

    (snap,) = llm.collective_rpc(drafter_snapshot)
    return snap


def settled_drafter_state(llm, timeout_s: float = 15.0) -> dict:
    """The drafter's snapshot once the engine has told it about the last finished requests.

    vLLM hands a step's finished request ids to the runner with the *next*
    scheduler output; the engine core runs that flush step on its own after
    ``generate`` returns, so a snapshot taken at once can race it. Poll until
    nothing is tracked or the timeout passes (a real leak still fails)."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        snap = drafter_state(llm)
        idle = snap["tracked_requests"] == 0
        if idle or time.monotonic() > deadline:
            return snap
        time.sleep(0.2)


def prompt_set(tokenizer) -> list[str]:
    """Varied prompts: chat, code, repetitive text, a long prompt, short ones."""
    from vllm_spec_plugins.bench.workloads import make_repetitive

    chat = [[{"role": "user", "content": q}] for q in (
        "What are three tips for staying productive while working from home?",
        "Explain why the sky is blue in two sentences.",
    )]
    code = [[{"role": "user", "content": "Write a Python function that returns the n-th "
                                          "Fibonacci number, with a docstring."}],
            [{"role": "user", "content": "Complete this function:\n```python\ndef "
                                          "is_palindrome(s: str) -> bool:\n    \"\"\"Return True "
                                          "if s reads the same backwards.\"\"\"\n```"}]]
    repetitive = make_repetitive(4, seed=3).prompts
    long_text = " ".join(f"Item {i}: the value of sensor {i % 7} was {i * 37 % 101} units."
                         for i in range(120))
    long = [[{"role": "user", "content": long_text + "\nList the last five items again."}]]
    msgs = chat + code + repetitive + long
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
               for m in msgs]
    prompts.append("the cat sat on the mat. the cat sat on the mat. the cat sat on the")
    return prompts



def cpu_expand_kernel_broken() -> bool:
    """True when the CPU kernel that vLLM's workers will use to spread per-request
    sampling parameters over draft positions is wrong (vLLM 0.32 CPU:
    ``expand_batch_to_tokens`` returns uninitialised memory for float32, see
    ``vllm_cpu_fixes.py``), i.e. sampling with speculative decoding cannot be
    correct. Loads the general plugins first, as a worker does, so the plugin's
    work-around counts; calls the implementation the worker would register
    directly (the worker's registration scans every loaded module, which breaks on
    numba's objects in a test process)."""
    import torch
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    if not current_platform.is_cpu():
        return False
    load_general_plugins()
    import vllm._custom_ops  # noqa: F401  (loads the CPU ops into torch.ops._C)
    from vllm.utils import cpu_triton_utils

    x = torch.tensor([0.7, 1.5, -1.0], dtype=torch.float32)
    cu = torch.tensor([2, 3, 5], dtype=torch.int32)
    out = torch.full((5,), 123.0, dtype=torch.float32)
    cpu_triton_utils._expand_kernel_impl(out, x, cu, -1, 1)
    return out.tolist() != [x[0].item(), x[0].item(), 1.5, 1.0, 1.0]


def check_sampled_digits_follow_the_model(llm, n: int = 200) -> None:
    """Lossless under sampling (see test_engine_suffix_tree.py for the prompt):
    sample ``n`` 3-token continuations at temperature 1 and bound the total
    variation between the sampled digit and the model's own distribution."""
    import math

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    tok = llm.get_tokenizer()
    ids = tok("A: 7 B: 3 C: 9 A: 4 B: 8 C: 1 A: 5 B: 2 C: 6 A")["input_ids"]
    before = spec_counters(llm)
    # Unseeded (one engine seed): seeded requests crash vLLM 0.32 CPU under chunked prefill.
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * n,
                        SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)
    after = spec_counters(llm)
    seqs = [tuple(o.outputs[0].token_ids) for o in outs]
    assert all(len(s) == 3 for s in seqs)
    # Drafts were verified in the sampled region (position 0 = the second token).
    assert after["accepted_tokens_per_pos"][0] - before.get("accepted_tokens_per_pos", [0])[0] > 0

    prefix = max(set(s[:2] for s in seqs), key=lambda p: sum(s[:2] == p for s in seqs))
    assert tok.decode(list(prefix)) == ": "
    digits = [s[2] for s in seqs if s[:2] == prefix]
    assert len(digits) >= 150  # p(": ") ~ 0.98: ~196 expected

    ref = llm.generate([TokensPrompt(prompt_token_ids=ids + list(prefix))],
                       SamplingParams(temperature=0.0, max_tokens=1, logprobs=20),
                       use_tqdm=False)[0]
    exact = {t: math.exp(lp.logprob) for t, lp in ref.outputs[0].logprobs[0].items()}
    cats = [t for t, p in exact.items() if p >= 0.02]  # the likely digits; rest = "other"
    assert len(cats) >= 4, {tok.decode([t]): p for t, p in exact.items()}
    p_true = [exact[t] for t in cats] + [1.0 - sum(exact[t] for t in cats)]
    counts = [sum(d == t for d in digits) for t in cats]
    counts.append(len(digits) - sum(counts))
    m = len(digits)
    tv = 0.5 * sum(abs(c / m - p) for c, p in zip(counts, p_true))
    # Bretagnolle-Huber-Carol: P(TV(empirical, true) >= eps) <= 2^K exp(-2 m eps^2)
    # for K categories and m samples. With delta = 1e-6 (a false failure once in a
    # million runs): eps = sqrt((K ln 2 + ln(1/delta)) / (2m)), about 0.21 for K = 7,
    # m = 196. A verifier that accepted drafts too often moves the drafted digit's
    # mass (p <= 0.5) towards 1: TV >= 0.5 (the broken CPU kernel gave ~0.8).
    k_cats, delta_ = len(p_true), 1e-6
    eps = math.sqrt((k_cats * math.log(2) + math.log(1 / delta_)) / (2 * m))
    report = {tok.decode([t]): (c, round(p * m, 1)) for t, c, p in zip(cats, counts, p_true)}
    assert tv < eps, f"TV {tv:.3f} >= {eps:.3f}; (sampled, expected) per digit: {report}"


def abort_one_of_two(llm, started, max_tokens: int = 120, max_steps: int = 40):
    """Start two greedy requests, step until ``started(drafter snapshot)`` holds
    (at most ``max_steps`` steps: whether a proposer drafts in a given step
    may be its own priced choice), abort "abort-me", run "keep-me" to the
    end and return its output. Always leaves the engine with no request, so
    a failure cannot spill into the next test (``llm.generate`` sorts
    request ids as integers)."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    engine.add_request("abort-me", "Tell me a long story about a dragon.", params)
    engine.add_request("keep-me", "List the numbers from 1 to 30.", params)
    try:
        ok = False
        for _ in range(max_steps):
            if not engine.has_unfinished_requests():
                break  # (a step of an idle engine waits for output forever)
            engine.step()
            ok = bool(started(drafter_state(llm)))
            if ok:
                break
        assert ok, f"the proposer never started on these two requests in {max_steps} steps"
        engine.abort_request(["abort-me"])
        finished = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    finished[out.request_id] = out
    finally:
        engine.abort_request(["abort-me", "keep-me"])
        while engine.has_unfinished_requests():
            engine.step()
    engine.step()  # let the runner see the last finished ids
    return finished["keep-me"]
