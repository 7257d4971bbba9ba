"""How long the drafter holds up an engine step when heavy work arrives.

``python -m vllm_spec_plugins.bench.step_stall [--out DIR]``

A batch of short requests decodes through the real drafter (``PluginDrafter``
with the real suffix-tree or hybrid proposer and numba kernels), driven by the
stand-in runner (bench/standin_runner.py: no model, so what is timed is the
drafter's own work inside each step). Meanwhile the heavy things arrive:
long prompts (32k and 128k tokens), an autosave of a large global cache every
16 finished requests (written and fsynced), and a large payload from another
replica. Two modes, same work:

* ``inline``: that work runs inside the step, as vllm-spec-plugins 0.1.0 did
  (trie built at the request's first step, save and import called from the step);
* ``background``: the integration layer as it is now (long prompts prepared on
  the background thread, saves and imports behind the proposer lock).

Reports p50 / p99 / max drafter time per step for each mode (``results.md``,
``results.json``). The model's own step time is not included: on a real engine
it is added to every step alike.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from vllm_spec_plugins.bench.standin_runner import StandInRequest, StandInRunner, vllm_config

SHORT_ROWS = 8
LONG_PROMPTS = (32_768, 131_072, 32_768, 131_072)


def _text(rng: np.random.Generator, n: int, vocab: int = 49_152) -> list[int]:
    """Token ids with the repetition of real text: phrases reused from a pool."""
    pool = [rng.integers(0, vocab, rng.integers(4, 40)).tolist() for _ in range(400)]
    out: list[int] = []
    while len(out) < n:
        out += pool[int(rng.integers(0, len(pool)))]
    return out[:n]


def run_mode(mode: str, method: str, steps: int, seed: int, workdir: str) -> dict:
    from vllm_spec_plugins.integration.drafter import PluginDrafter

    rng = np.random.default_rng(seed)
    cache = os.path.join(workdir, f"{mode}-{method}.npz")
    key = "cache_path" if method == "suffix_tree" else "suffix_tree"
    settings = ({"method": method, "cache_path": cache} if method == "suffix_tree" else
                {"method": method, key: {"cache_path": cache}})
    drafter = PluginDrafter(vllm_config(settings, k=8, max_model_len=140_000),
                            patch_runner=False, ranks=(0, 0, 1))
    drafter.proposer.warmup()
    proposer = drafter.proposer
    # A global cache of earlier responses (what a served engine holds after a while).
    suffix = getattr(proposer, "suffix", proposer)
    for _ in range(400):
        suffix._cache_response(np.asarray(_text(rng, 1000), np.int32))
    payload = {"suffix_responses": [np.asarray(_text(rng, 2000), np.int32) for _ in range(500)]}
    every = 16
    if mode == "inline":
        drafter.requests.inline_prompt_tokens = 10 ** 9
        drafter.saver.enabled = False
    else:
        drafter.saver.every = every
    runner = StandInRunner(drafter, max_reqs=SHORT_ROWS + 2, max_len=140_000)
    n_req = 0

    def short():
        nonlocal n_req
        n_req += 1
        text = _text(rng, 200 + 64)
        return StandInRequest(f"s{n_req}", text[:200], text[200:])

    for _ in range(SHORT_ROWS):
        runner.add(short())
    long_at = {int(steps * (i + 1) / (len(LONG_PROMPTS) + 1)): n for i, n in
               enumerate(LONG_PROMPTS)}
    import_at = steps // 2 + 7
    finished = saves = 0
    for step in range(steps):
        if step in long_at:
            text = _text(rng, long_at[step] + 32)
            runner.add(StandInRequest(f"long{step}", text[:-32], text[-32:]))
        if step == import_at:
            if mode == "inline":
                t0 = time.perf_counter()
                proposer.import_shared(payload)
                runner.drafter_seconds.append(time.perf_counter() - t0)  # counted in this step
            else:
                drafter.background.submit_locked("merging shared state",
                                                 proposer.import_shared, payload)
        before = drafter.requests.stats["finished"]
        runner.step()
        done = drafter.requests.stats["finished"] - before
        while len([r for r in runner.rows if not r.req_id.startswith("long")]) < SHORT_ROWS:
            runner.add(short())
        if mode == "inline" and done:
            finished += done
            if finished // every > (finished - done) // every:
                t0 = time.perf_counter()
                proposer.save_state()
                saves += 1
                runner.drafter_seconds[-1] += time.perf_counter() - t0
    drafter.background.shutdown(wait=True)
    drafter.saver.close()
    ms = np.asarray(runner.drafter_seconds) * 1e3
    return {"mode": mode, "method": method, "steps": int(ms.size),
            "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "max_ms": float(ms.max()), "mean_ms": float(ms.mean()),
            "saves": saves if mode == "inline" else drafter.saver.saves,
            "busy_steps": drafter.stats["busy_steps"],
            "waiting_for_state_steps": drafter.requests.stats["waiting_for_state_steps"],
            "accepted_tokens": runner.accepted}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="suffix_tree,suffix_recycling")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="docs/bench/step_stall")
    args = ap.parse_args(argv)
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    plan = [(r, m, mode) for r in range(args.repeats) for m in args.methods.split(",")
            for mode in (("inline", "background") if r % 2 == 0 else ("background", "inline"))]
    with tempfile.TemporaryDirectory() as tmp:
        for r, method, mode in tqdm(plan, desc="step stall"):
            runs.append({"repeat": r, **run_mode(mode, method, args.steps, seed=r, workdir=tmp)})
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    lines = ["| method | mode | p50 ms | p99 ms | max ms | steps the long request waited | "
             "saves |", "|---|---|--:|--:|--:|--:|--:|"]
    for method in args.methods.split(","):
        for mode in ("inline", "background"):
            rs = [x for x in runs if x["method"] == method and x["mode"] == mode]
            med = {k: float(np.median([x[k] for x in rs])) for k in
                   ("p50_ms", "p99_ms", "max_ms", "waiting_for_state_steps", "saves")}
            label = "inline (0.1.0)" if mode == "inline" else "background (now)"
            lines.append(f"| {method} | {label} | {med['p50_ms']:.2f} | {med['p99_ms']:.1f} | "
                         f"{med['max_ms']:.1f} | {med['waiting_for_state_steps']:.0f} | "
                         f"{med['saves']:.0f} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(
        f"Drafter time per step (median of {args.repeats} repeats; {args.steps} steps, "
        f"{SHORT_ROWS} short rows, long prompts {LONG_PROMPTS}, autosave every 16 "
        "finished requests, one 500-response shared payload)\n\n" + table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
