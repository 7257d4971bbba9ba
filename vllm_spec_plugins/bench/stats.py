"""Benchmark arithmetic: spec-decode counters, acceptance, speedups, equality.

Pure Python (unit-tested without vLLM). A *run* is one (repeat, method) worker
result: ``{"label", "repeat", "status": "ok"|"failed", "measurements": [...]}``;
a *measurement* is one (workload, scenario) cell of a run: ``{"workload",
"scenario", "wall_s", "output_tokens", "token_ids" or "texts", "spec",
"drafter" (this package's proposers), "draft_time" (drafting seconds and calls,
any method, offline), optional "latency" (online) and "task" (scored outputs)}``.
"""

from __future__ import annotations

import math

import statistics
from typing import Any, Iterable, Optional, Sequence

BASELINE = "none"

# Spec-decode metric names as ``llm.get_metrics()`` reports them.
M_DRAFTS = "vllm:spec_decode_num_drafts"
M_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
M_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
M_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
TEXT_TURN_SEPARATOR = "\x1e"  # joins the turns of a conversation for text equality
LATENCY_KEYS = ("ttft_ms_p50", "ttft_ms_p90", "tpot_ms_p50", "itl_ms_p50", "itl_ms_p90")


def empty_counters() -> dict[str, Any]:
    return {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}


def spec_counters(metrics: Iterable[Any]) -> dict[str, Any]:
    """Spec-decode counters out of ``llm.get_metrics()`` (summed over label sets);
    a counter that is absent (no speculation) is 0 / []."""
    out = empty_counters()
    names = {M_DRAFTS: "drafts", M_DRAFT_TOKENS: "draft_tokens", M_ACCEPTED: "accepted"}
    for m in metrics:
        name = getattr(m, "name", None)
        if name in names:
            out[names[name]] += int(getattr(m, "value", 0) or 0)
        elif name == M_ACCEPTED_PER_POS:
            vals = [int(v) for v in (getattr(m, "values", None) or [])]
            acc = out["accepted_per_pos"]
            if len(acc) < len(vals):
                acc.extend([0] * (len(vals) - len(acc)))
            for i, v in enumerate(vals):
                acc[i] += v
    return out


def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of two counter dicts."""
    b_pos, a_pos = list(before.get("accepted_per_pos") or []), list(after.get("accepted_per_pos") or [])
    n = max(len(a_pos), len(b_pos))
    b_pos += [0] * (n - len(b_pos))
    a_pos += [0] * (n - len(a_pos))
    return {"drafts": after["drafts"] - before["drafts"],
            "draft_tokens": after["draft_tokens"] - before["draft_tokens"],
            "accepted": after["accepted"] - before["accepted"],
            "accepted_per_pos": [a - b for a, b in zip(a_pos, b_pos)]}


def sum_counters(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total = empty_counters()
    for c in items:
        acc = total["accepted_per_pos"]
        for key in ("drafts", "draft_tokens", "accepted"):
            total[key] += int(c.get(key, 0) or 0)
        pos = c.get("accepted_per_pos") or []
        if len(acc) < len(pos):
            acc.extend([0] * (len(pos) - len(acc)))
        for i, v in enumerate(pos):
            acc[i] += int(v)
    return total


def mean_acceptance_length(drafts: int, accepted: int) -> Optional[float]:
    """vLLM's definition: 1 + accepted / drafts (tokens per verification step)."""
    return None if drafts <= 0 else 1.0 + accepted / drafts


def acceptance_per_position(accepted_per_pos: Sequence[int], drafts: int) -> list[float]:
    """Rate at position i = accepted_per_pos[i] / drafts."""
    if drafts <= 0:
        return []
    return [v / drafts for v in accepted_per_pos]


def draft_acceptance_rate(draft_tokens: int, accepted: int) -> Optional[float]:
    return None if draft_tokens <= 0 else accepted / draft_tokens


BUDGET_COUNTERS = ("rows", "rows_cut", "rows_emptied", "proposed_tokens", "kept_tokens",
                   "tokens_saved", "verified_rows", "accepted_tokens")


def drafter_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict[str, Any]]:
    """Difference of two ``drafter_snapshot`` dicts (numeric counters), plus
    the proposer's own diagnostics after the cell (``proposer_stats``, e.g.
    the recycling matrix's calibration curve), kept as they are."""
    if before is None or after is None:
        return None
    keys = ("steps", "rows", "drafted_tokens", "propose_seconds", "capture_seconds", "errors")
    out: dict[str, Any] = {k: after.get(k, 0) - before.get(k, 0) for k in keys if k in after}
    if after.get("proposer_stats") is not None:
        out["proposer_stats"] = after["proposer_stats"]
    b0, b1 = before.get("draft_budget"), after.get("draft_budget")
    if isinstance(b0, dict) and isinstance(b1, dict):
        # What the shared budget did in this cell: tokens the method proposed,
        # kept after the cut, and accepted of those; the price at the end.
        out["draft_budget"] = {k: b1.get(k, 0) - b0.get(k, 0) for k in BUDGET_COUNTERS
                               if k in b1}
        out["draft_budget"]["price"] = b1.get("price")
        out["draft_budget"]["enabled"] = b1.get("enabled", True)
    return out


SCORER_COUNTERS = ("lossy_rows", "lossless_rows", "drafted_tokens", "standard_accepted",
                   "scorer_accepted", "errors")


def scorer_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict[str, Any]]:
    """Difference of two ``scorer_snapshot`` dicts: tokens accepted by the
    standard rule and only by the lossy scorer, rows lossy and lossless."""
    if before is None and after is None:
        return None
    before = before or {}
    after = after or {}
    return {k: after.get(k, 0) - before.get(k, 0) for k in SCORER_COUNTERS}


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96
                      ) -> Optional[tuple[float, float, float, int]]:
    """Mean of b - a over paired items (e.g. a lossy method's pass/fail per
    task minus the baseline's) with a normal-approximation 95% interval:
    (difference, low, high, n)."""
    if not a or len(a) != len(b):
        return None
    d = [float(y) - float(x) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n)
    return mean, mean - half, mean + half, n


def draft_time_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict[str, Any]]:
    """Difference of two ``draft_timer_snapshot`` dicts: drafting seconds and calls."""
    if before is None or after is None:
        return None
    return {"seconds": after["seconds"] - before["seconds"], "calls": after["calls"] - before["calls"]}


def proposer_ms_per_step(propose_seconds: float, steps: int) -> Optional[float]:
    return None if steps <= 0 else 1000.0 * propose_seconds / steps


def median_spread(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, min, max) of the non-None values; Nones for none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def first_difference(a: Sequence, b: Sequence) -> Optional[int]:
    """Index of the first differing item (length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(reference: Sequence[Sequence], other: Sequence[Sequence]) -> list[tuple[int, int]]:
    """Per-prompt equality: list of (prompt index, first differing position)."""
    if len(reference) != len(other):
        raise ValueError(f"output counts differ: {len(reference)} vs {len(other)}")
    out = []
    for i, (a, b) in enumerate(zip(reference, other)):
        d = first_difference(a, b)
        if d is not None:
            out.append((i, d))
    return out


def comparable_outputs(m: dict) -> Optional[list]:
    """What greedy equality compares: token ids when the worker had them (offline),
    else the texts with the turns joined (online)."""
    if m.get("token_ids") is not None:
        return m["token_ids"]
    if m.get("texts") is not None:
        return [TEXT_TURN_SEPARATOR.join(t) for t in m["texts"]]
    return None


def _ok(runs: Sequence[dict], label: str) -> list[dict]:
    return [r for r in runs if r.get("label") == label and r.get("status") == "ok"]


def _cell(run: Optional[dict], workload: str, scenario: str) -> Optional[dict]:
    if run is None:
        return None
    for m in run.get("measurements", []):
        if m["workload"] == workload and m["scenario"] == scenario:
            return m
    return None


def _tps(m: dict) -> Optional[float]:
    return m["output_tokens"] / m["wall_s"] if m.get("wall_s", 0) > 0 and m.get("output_tokens") else None


def summarize(runs: Sequence[dict], methods: Sequence[str], cells: Sequence[tuple[str, str]],
              lossless: Optional[dict[str, bool]] = None, baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per (workload, scenario, method): medians and spreads over repeats."""
    lossless = lossless or {}
    rows = []
    base_by_repeat = {r["repeat"]: r for r in _ok(runs, baseline)}
    first_base = base_by_repeat[min(base_by_repeat)] if base_by_repeat else None
    for wname, scen in cells:
        for label in methods:
            all_runs = [r for r in runs if r.get("label") == label]
            ok = [r for r in _ok(runs, label) if _cell(r, wname, scen) is not None]
            row: dict[str, Any] = {"workload": wname, "scenario": scen, "method": label,
                                   "lossless": lossless.get(label, True),
                                   "repeats_ok": len(ok), "repeats_total": len(all_runs),
                                   "status": "ok" if ok else "failed"}
            tps, speedups, scores = [], [], []
            latency: dict[str, list] = {k: [] for k in LATENCY_KEYS}
            spec_items, prop_s, prop_steps, wall_total = [], 0.0, 0, 0.0
            draft_s, draft_calls = 0.0, 0
            has_drafter = has_timer = False
            budget: Optional[dict[str, float]] = None
            budget_prices: list[Optional[float]] = []
            identical = compared = 0
            mismatches: list[dict[str, Any]] = []
            task_metric = None
            pairs_a: list[float] = []
            pairs_b: list[float] = []
            scorer: Optional[dict[str, int]] = None
            for r in sorted(ok, key=lambda r: r["repeat"]):
                m = _cell(r, wname, scen)
                t = _tps(m)
                tps.append(t)
                wall_total += m["wall_s"]
                spec_items.append(m.get("spec") or {})
                if m.get("drafter"):
                    has_drafter = True
                    prop_s += float(m["drafter"].get("propose_seconds", 0.0))
                    prop_steps += int(m["drafter"].get("steps", 0))
                    # reading the target's top-k at verification is drafting work too
                    draft_s += float(m["drafter"].get("capture_seconds", 0.0))
                    cell_budget = m["drafter"].get("draft_budget")
                    if isinstance(cell_budget, dict):
                        budget = budget or {k: 0 for k in BUDGET_COUNTERS}
                        for k in BUDGET_COUNTERS:
                            budget[k] += cell_budget.get(k, 0)
                        budget_prices.append(cell_budget.get("price"))
                        budget["enabled"] = cell_budget.get("enabled", True)
                if m.get("draft_time"):
                    has_timer = True
                    draft_s += float(m["draft_time"]["seconds"])
                    draft_calls += int(m["draft_time"]["calls"])
                for k in LATENCY_KEYS:
                    latency[k].append((m.get("latency") or {}).get(k))
                if m.get("task"):
                    scores.append(m["task"]["score"])
                    task_metric = m["task"]["metric"]
                    bm = _cell(base_by_repeat.get(r["repeat"]) or first_base, wname, scen)
                    if label != baseline and bm and bm.get("task"):
                        pairs_a += [float(x) for x in bm["task"].get("per_prompt", [])]
                        pairs_b += [float(x) for x in m["task"].get("per_prompt", [])]
                if m.get("scorer"):
                    scorer = scorer or {k: 0 for k in SCORER_COUNTERS}
                    for k in SCORER_COUNTERS:
                        scorer[k] += m["scorer"].get(k, 0)
                # speedup is paired with the baseline of the same repeat
                b = _cell(base_by_repeat.get(r["repeat"]), wname, scen)
                bt = _tps(b) if b else None
                if t is not None and bt:
                    speedups.append(t / bt)
                # equality: against the same repeat's baseline, else the first one;
                # the baseline itself against its first repeat (determinism).
                if label == baseline:
                    ref = first_base if first_base is not r else None
                else:
                    ref = base_by_repeat.get(r["repeat"]) or first_base
                rm = _cell(ref, wname, scen)
                a_out, b_out = comparable_outputs(rm) if rm else None, comparable_outputs(m)
                if a_out is not None and b_out is not None and len(a_out) == len(b_out):
                    diffs = compare_outputs(a_out, b_out)
                    compared += len(b_out)
                    identical += len(b_out) - len(diffs)
                    for idx, pos in diffs:
                        mismatches.append({"repeat": r["repeat"], "prompt": idx, "position": pos})
            row["tokens_per_s"], row["tokens_per_s_min"], row["tokens_per_s_max"] = median_spread(tps)
            row["tokens_per_s_all"] = tps
            row["speedup"], row["speedup_min"], row["speedup_max"] = median_spread(speedups)
            row["speedup_all"] = speedups
            spec = sum_counters(spec_items)
            row["spec"] = spec
            row["mean_acceptance_length"] = mean_acceptance_length(spec["drafts"], spec["accepted"])
            row["draft_acceptance_rate"] = draft_acceptance_rate(spec["draft_tokens"], spec["accepted"])
            row["acceptance_per_position"] = acceptance_per_position(spec["accepted_per_pos"], spec["drafts"])
            row["proposer_ms_per_step"] = proposer_ms_per_step(prop_s, prop_steps) if has_drafter else None
            row["proposer_share"] = (prop_s / wall_total) if has_drafter and wall_total > 0 else None
            row["draft_ms_per_step"] = proposer_ms_per_step(draft_s, draft_calls) if has_timer else None
            row["draft_share"] = (draft_s / wall_total) if has_timer and wall_total > 0 else None
            if budget is not None:  # summed over repeats; the price is the median at cell ends
                budget["price"] = median_spread(budget_prices)[0]
            row["draft_budget"] = budget
            for k in LATENCY_KEYS:
                row[k] = median_spread(latency[k])[0]
            row["task_metric"] = task_metric
            row["task_score"] = median_spread(scores)[0]
            # a method's task score minus the baseline's, paired by prompt and repeat
            row["task_difference"] = (paired_difference(pairs_a, pairs_b)
                                      if len(pairs_a) == len(pairs_b) else None)
            row["scorer"] = scorer
            row["identical"] = identical if compared else None
            row["compared"] = compared if compared else None
            row["mismatches"] = mismatches
            rows.append(row)
    return rows


def failures(runs: Sequence[dict]) -> list[dict]:
    return [r for r in runs if r.get("status") != "ok"]
