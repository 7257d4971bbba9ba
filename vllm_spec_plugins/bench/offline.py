"""The offline benchmark worker: one process, one ``LLM`` engine, one method.

The parent (``runner.py``) starts ``python -m vllm_spec_plugins.bench.offline
SPEC.json`` per (repeat, method): the speculative config is fixed per engine, and
two engines must never share the machine's memory. The worker renders every
cell's conversations with the tokenizer's chat template, runs one untimed
warm-up generate, then times ``llm.generate`` per cell (greedy), in chunks of the
cell's batch size. A conversation with follow-up turns is continued with the
model's own answer, turn by turn, and every turn is timed.

It records per cell: wall time, output tokens, the output token ids (all turns,
for the greedy-equality check) and texts (for task scoring), the spec-decode
counter deltas (``llm.get_metrics()``), the time every method spends drafting
(``integration.install_draft_timer``) and, for this package's proposers, the
drafter's own counters (``integration.drafter_snapshot``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

from vllm_spec_plugins.bench.methods import MethodSpec, engine_kwargs
from vllm_spec_plugins.bench.stats import (counters_delta, draft_time_delta, drafter_delta,
                                           scorer_delta, spec_counters)

WARMUP_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
WARMUP_MAX_TOKENS = 8
TURN_SEPARATOR = -1  # between the turns of one conversation in "token_ids"


def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        # A base model without a chat template: plain concatenation.
        return "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def chunks(items: list, size: Optional[int]) -> list[list]:
    if not size or size >= len(items):
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _first(results: list) -> Optional[dict]:
    return next((r for r in results if r is not None), None)


def _drafter_stats(llm: Any) -> Optional[dict]:
    from vllm_spec_plugins.integration import drafter_snapshot

    return _first(llm.collective_rpc(drafter_snapshot))


def _draft_time(llm: Any) -> Optional[dict]:
    from vllm_spec_plugins.integration import draft_timer_snapshot

    return _first(llm.collective_rpc(draft_timer_snapshot))


def _scorer_stats(llm: Any) -> Optional[dict]:
    from vllm_spec_plugins.integration import scorer_snapshot

    return _first(llm.collective_rpc(scorer_snapshot))


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _run_cell(llm: Any, tok: Any, params: Any, cell: dict) -> tuple[float, list[list[int]], list[list[str]]]:
    """Generate every conversation of a cell, all turns; returns (wall seconds,
    token ids per conversation, texts per conversation per turn)."""
    convs = [list(p) for p in cell["prompts"]]
    followups = cell.get("followups") or [[] for _ in convs]
    token_ids: list[list[int]] = [[] for _ in convs]
    texts: list[list[str]] = [[] for _ in convs]
    wall = 0.0
    for idx in chunks(list(range(len(convs))), cell.get("batch_size")):
        turns = 1 + max((len(followups[i]) for i in idx), default=0)
        for turn in range(turns):
            live = [i for i in idx if turn == 0 or turn <= len(followups[i])]
            if turn > 0:
                for i in live:
                    convs[i] = convs[i] + [{"role": "assistant", "content": texts[i][-1]},
                                           {"role": "user", "content": followups[i][turn - 1]}]
            prompts = [render_prompt(tok, convs[i]) for i in live]
            t = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            wall += time.perf_counter() - t
            for i, o in zip(live, outs):
                if turn > 0:
                    token_ids[i].append(TURN_SEPARATOR)
                token_ids[i].extend(int(x) for x in o.outputs[0].token_ids)
                texts[i].append(o.outputs[0].text)
    return wall, token_ids, texts


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    method = MethodSpec(**spec["method"])
    result_path = Path(spec["result_path"])
    from vllm_spec_plugins.cpu_runtime import mapped_runtime_libs

    # Before vLLM edits LD_PRELOAD (it adds torch's libgomp for its engine process):
    # what this worker was started with, and what the loader actually mapped.
    cpu_preload = {"LD_PRELOAD": os.environ.get("LD_PRELOAD", ""), "mapped": mapped_runtime_libs()}
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(method, model=spec["model"], dtype=spec["dtype"], seed=spec["seed"],
                           k=spec["k"], kv_cache_bytes=spec["kv_cache_bytes"],
                           plugin_config=spec.get("plugin_config"),
                           draft_model_path=spec.get("draft_model_path"),
                           enforce_eager=spec.get("enforce_eager", False))
    print(f"[bench worker] {method.label} repeat {spec['repeat']}: LLM({kwargs})",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    is_plugin = method.kind == "plugin"
    if method.kind != "none":
        # drafting time of every method, vLLM's built-ins included
        from vllm_spec_plugins.integration import install_draft_timer

        llm.collective_rpc(install_draft_timer)

    llm.generate([render_prompt(tok, WARMUP_MESSAGES)],
                 SamplingParams(temperature=0, max_tokens=WARMUP_MAX_TOKENS), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    measurements = []
    for cell in spec["cells"]:
        m0 = spec_counters(llm.get_metrics())
        d0 = _drafter_stats(llm) if is_plugin else None
        t0 = _draft_time(llm) if method.kind != "none" else None
        s0 = _scorer_stats(llm) if method.scorer else None
        wall, token_ids, texts = _run_cell(llm, tok, params, cell)
        s1 = _scorer_stats(llm) if method.scorer else None
        m1 = spec_counters(llm.get_metrics())
        d1 = _drafter_stats(llm) if is_plugin else None
        t1 = _draft_time(llm) if method.kind != "none" else None
        out_tokens = sum(sum(1 for t in ids if t != TURN_SEPARATOR) for ids in token_ids)
        measurements.append({
            "workload": cell["workload"], "scenario": cell["scenario"],
            "wall_s": wall, "num_prompts": len(token_ids), "output_tokens": out_tokens,
            "token_ids": token_ids, "texts": texts,
            "spec": counters_delta(m0, m1) if method.kind != "none" else None,
            "drafter": drafter_delta(d0, d1),
            "draft_time": draft_time_delta(t0, t1),
            "scorer": scorer_delta(s0, s1),
        })
        # "cell done" is what the parent counts for its progress bar
        print(f"[bench worker] cell done: {cell['workload']} / {cell['scenario']}: {out_tokens} "
              f"tokens in {wall:.2f} s", file=sys.stderr, flush=True)
    import torch
    import vllm

    write_json_atomic(result_path, {
        "status": "ok", "label": method.label, "repeat": spec["repeat"],
        "startup_s": startup, "vllm_version": getattr(vllm, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "cpu_preload": cpu_preload, "measurements": measurements})
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="offline bench worker (internal)")
    p.add_argument("spec", metavar="SPEC_JSON")
    return worker_main(p.parse_args(argv).spec)


if __name__ == "__main__":
    sys.exit(main())
