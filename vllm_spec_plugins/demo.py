"""The README's demo: the same prompts with and without the suffix-tree proposer.

Prints output tokens/s of each, the mean acceptance length, and whether the
greedy outputs are token-identical (float32, so near-ties cannot flip).
"""

from __future__ import annotations

import gc
import time


def _spec_counters(llm) -> dict[str, float]:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:spec_decode_num_")] = float(m.value)
    return out


def run_demo(model: str = "smollm2-135m", max_tokens: int = 160, k: int = 16) -> int:
    from vllm import LLM, SamplingParams

    from vllm_spec_plugins.bench.workloads import make_repetitive
    from vllm_spec_plugins.integration import speculative_config
    from vllm_spec_plugins.models import resolve_model

    path = resolve_model(model)
    workload = make_repetitive(8, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    runs = {}
    for name, extra in [
        ("no speculation", {}),
        ("suffix_tree", {"speculative_config": speculative_config(k),
                         "additional_config": {"spec_plugins": {"method": "suffix_tree"}}}),
    ]:
        llm = LLM(model=path, dtype="float32", max_model_len=4096, seed=0,
                  kv_cache_memory_bytes=1 << 30, disable_log_stats=False, **extra)
        tok = llm.get_tokenizer()
        prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                   for m in workload.prompts]
        llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=8), use_tqdm=False)
        before = _spec_counters(llm)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t0
        after = _spec_counters(llm)
        n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
        drafts = after.get("drafts", 0) - before.get("drafts", 0)
        acc = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
        runs[name] = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
                      "tps": n_tok / dt, "mal": (1 + acc / drafts) if drafts else None,
                      "text": outs[0].outputs[0].text}
        del llm
        gc.collect()

    base, spec = runs["no speculation"], runs["suffix_tree"]
    same = sum(a == b for a, b in zip(base["tokens"], spec["tokens"]))
    print("\n=== vllm-spec-plugins demo: suffix-tree proposer vs no speculation ===")
    print(f"model: {model}   prompts: {len(base['tokens'])} (repetitive edit workload)   "
          f"max_tokens: {max_tokens}   k: {k}   dtype: float32")
    print(f"{'method':16s} {'tokens/s':>9s} {'mean acceptance length':>23s}")
    for name, r in runs.items():
        mal = f"{r['mal']:.2f}" if r["mal"] else "-"
        print(f"{name:16s} {r['tps']:9.1f} {mal:>23s}")
    print(f"speedup: {spec['tps'] / base['tps']:.2f}x")
    print(f"greedy outputs identical: {'yes' if same == len(base['tokens']) else 'NO'} "
          f"({same}/{len(base['tokens'])})")
    print("first output:\n" + spec["text"][:400])
    return 0 if same == len(base["tokens"]) else 1
