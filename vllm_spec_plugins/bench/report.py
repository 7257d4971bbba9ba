"""Benchmark report: the Markdown tables and the PNG plots (matplotlib, Agg).

Pure functions of the summary rows (``stats.summarize``); no vLLM.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from vllm_spec_plugins.bench.stats import (
    BASELINE,
    acceptance_per_position,
    failures,
    mean_acceptance_length,
    median_spread,
    sum_counters,
)

DASH = "–"
TABLE_POSITIONS = 8  # acceptance positions shown in the table
# Label suffix of a method's runs with Intel OpenMP + tcmalloc preloaded (bench
# --cpu-preload both): "none" and "none+preload" are the same method.
PRELOAD_SUFFIX = "+preload"

EQUALITY_NOTE = (
    "Greedy equality compares each method's outputs with `none`, prompt by prompt (token "
    "ids offline, text online). In bfloat16, verifying k+1 tokens at once changes kernel "
    "shapes and rounding, so near-ties in the argmax can flip and outputs may diverge "
    "without a bug; float32 (`--dtype float32`) is the strict check. Lossy methods are "
    "expected to differ: judge them by the task score."
)


def fmt(x: Optional[float], digits: int = 2, suffix: str = "") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return DASH
    return f"{x:.{digits}f}{suffix}"


def fmt_pct(x: Optional[float], digits: int = 1) -> str:
    return DASH if x is None else f"{100.0 * x:.{digits}f}%"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]],
                   align: Optional[Sequence[str]] = None) -> str:
    """A GitHub Markdown table; ``align`` entries are 'l' or 'r'."""
    align = list(align or ["l"] * len(headers))
    cells = [list(map(str, headers))] + [[str(c) for c in r] for r in rows]
    for r in cells:
        if len(r) != len(headers):
            raise ValueError(f"row has {len(r)} cells, expected {len(headers)}: {r}")
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join((("-" * (w + 1)) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def _tps_cell(row: dict) -> tuple[str, str]:
    if row["status"] != "ok":
        return "FAILED", DASH
    med, lo, hi = row["tokens_per_s"], row["tokens_per_s_min"], row["tokens_per_s_max"]
    spread = DASH if lo is None or row["repeats_ok"] < 2 else f"{lo:.1f}–{hi:.1f}"
    return fmt(med, 1), spread


def _speedup_cell(row: dict, baseline: str) -> str:
    if row["status"] != "ok" or row["speedup"] is None:
        return DASH
    s = f"{row['speedup']:.2f}x"
    if row["repeats_ok"] >= 2 and row["speedup_min"] is not None and row["method"] != baseline:
        s += f" ({row['speedup_min']:.2f}–{row['speedup_max']:.2f})"
    return s


def _identical_cell(row: dict, baseline: str) -> str:
    if row["status"] != "ok":
        return DASH
    if row["compared"] is None:
        return "ref" if row["method"] == baseline else DASH
    s = f"{row['identical']}/{row['compared']}"
    if row["identical"] < row["compared"]:
        s += " !" if row.get("lossless", True) else " (lossy)"
    return s


def _method_label(row: dict) -> str:
    label = row["method"] + ("" if row.get("lossless", True) else " [LOSSY]")
    if row["status"] == "ok" and row["repeats_ok"] < row["repeats_total"]:
        label += f" ({row['repeats_ok']}/{row['repeats_total']} runs ok)"
    return label


def main_table(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    online = any(r.get("ttft_ms_p50") is not None for r in rows)
    scored = any(r.get("task_score") is not None for r in rows)
    headers = ["workload", "scenario", "method", "tok/s (median)", "min–max", "speedup",
               "mean acc. len", "draft acc. rate", "draft ms/step", "draft % wall"]
    align = ["l", "l", "l"] + ["r"] * 7
    if online:
        headers += ["TTFT p50 ms", "TPOT p50 ms", "ITL p50 ms"]
        align += ["r"] * 3
    if scored:
        headers += ["task score"]
        align += ["r"]
    headers += [f"identical to {baseline}"]
    align += ["r"]
    body = []
    for r in rows:
        tps, spread = _tps_cell(r)
        ok = r["status"] == "ok"
        cells = [r["workload"], r["scenario"], _method_label(r), tps, spread,
                 _speedup_cell(r, baseline),
                 fmt(r["mean_acceptance_length"]) if ok else DASH,
                 fmt_pct(r["draft_acceptance_rate"]) if ok else DASH,
                 fmt(r.get("draft_ms_per_step"), 3) if ok else DASH,
                 fmt_pct(r.get("draft_share")) if ok else DASH]
        if online:
            cells += [fmt(r.get(k), 1) if ok else DASH
                      for k in ("ttft_ms_p50", "tpot_ms_p50", "itl_ms_p50")]
        if scored:
            score = r.get("task_score")
            cells.append(DASH if score is None or not ok else f"{r['task_metric']} {100 * score:.1f}%")
        cells.append(_identical_cell(r, baseline))
        body.append(cells)
    return markdown_table(headers, body, align)


def speedup_pivot(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    """One line per (workload, scenario), one column per method: the median
    speedup over the baseline and the mean acceptance length (τ); a lossy
    method also shows its task score next to the baseline's."""
    methods: list[str] = []
    cells: dict[tuple[str, str], dict[str, str]] = {}
    base_score = {(r["workload"], r["scenario"]): r.get("task_score") for r in rows
                  if r["method"] == baseline and r["status"] == "ok"}
    for r in rows:
        if r["method"] == baseline:
            continue
        if r["method"] not in methods:
            methods.append(r["method"])
        if r["status"] != "ok" or r["speedup"] is None:
            text = "FAILED" if r["status"] != "ok" else DASH
        else:
            text = f"{r['speedup']:.2f}x"
            if r["mean_acceptance_length"] is not None:
                text += f" (τ {r['mean_acceptance_length']:.1f})"
            if not r.get("lossless", True) and r.get("task_score") is not None:
                # a lossy method's task score, next to the target's own (the baseline)
                ref = base_score.get((r["workload"], r["scenario"]))
                text += f" [{r['task_metric']} {100 * r['task_score']:.0f}%"
                text += f" vs {100 * ref:.0f}%" if ref is not None else ""
                diff = r.get("task_difference")
                if diff:
                    d, lo, hi, n = diff
                    text += f", Δ {100 * d:+.1f} pts (95% CI {100 * lo:+.1f}..{100 * hi:+.1f}, n={n})"
                text += "]"
        cells.setdefault((r["workload"], r["scenario"]), {})[r["method"]] = text
    if not methods:
        return "_(no speculative method)_"
    body = [[w, s] + [c.get(m, DASH) for m in methods] for (w, s), c in cells.items()]
    return markdown_table(["workload", "scenario"] + methods, body, ["l", "l"] + ["r"] * len(methods))


def _run_tps(run: dict, workload: str, scenario: str) -> Optional[float]:
    for m in run.get("measurements", []):
        if m["workload"] == workload and m["scenario"] == scenario:
            if m.get("wall_s", 0) > 0 and m.get("output_tokens"):
                return m["output_tokens"] / m["wall_s"]
    return None


def preload_pairs(runs: Sequence[dict]) -> list[dict[str, Any]]:
    """For every method run with and without the CPU preload (``X`` and
    ``X+preload``) and every cell: tok/s of each (median over repeats) and the
    ratio with ÷ without, paired within a repeat (median, min, max)."""
    ok = [r for r in runs if r.get("status") == "ok"]
    by_key = {(r["label"], r["repeat"]): r for r in ok}
    plain_labels = []
    for r in ok:
        if r["label"].endswith(PRELOAD_SUFFIX):
            plain = r["label"][: -len(PRELOAD_SUFFIX)]
            if plain not in plain_labels:
                plain_labels.append(plain)
    out = []
    for plain in plain_labels:
        cells: list[tuple[str, str]] = []
        for r in ok:
            if r["label"] in (plain, plain + PRELOAD_SUFFIX):
                for m in r.get("measurements", []):
                    if (m["workload"], m["scenario"]) not in cells:
                        cells.append((m["workload"], m["scenario"]))
        for workload, scenario in cells:
            without, with_, ratios = [], [], []
            repeats = sorted({rep for (label, rep) in by_key if label == plain}
                             | {rep for (label, rep) in by_key if label == plain + PRELOAD_SUFFIX})
            for rep in repeats:
                a = by_key.get((plain, rep))
                b = by_key.get((plain + PRELOAD_SUFFIX, rep))
                ta = _run_tps(a, workload, scenario) if a else None
                tb = _run_tps(b, workload, scenario) if b else None
                if ta is not None:
                    without.append(ta)
                if tb is not None:
                    with_.append(tb)
                if ta and tb is not None:
                    ratios.append(tb / ta)
            ratio, ratio_min, ratio_max = median_spread(ratios)
            out.append({"workload": workload, "scenario": scenario, "method": plain,
                        "tokens_per_s": median_spread(without)[0],
                        "tokens_per_s_preload": median_spread(with_)[0],
                        "ratio": ratio, "ratio_min": ratio_min, "ratio_max": ratio_max,
                        "pairs": len(ratios)})
    return out


def preload_table(runs: Sequence[dict]) -> str:
    """The side-by-side table of :func:`preload_pairs`."""
    body = []
    for p in preload_pairs(runs):
        ratio = DASH if p["ratio"] is None else f"{p['ratio']:.2f}x"
        if p["pairs"] >= 2:
            ratio += f" ({p['ratio_min']:.2f}–{p['ratio_max']:.2f})"
        body.append([p["workload"], p["scenario"], p["method"], fmt(p["tokens_per_s"], 1),
                     fmt(p["tokens_per_s_preload"], 1), ratio])
    if not body:
        return "_(no method ran with and without the preload)_"
    return markdown_table(["workload", "scenario", "method", "tok/s without", "tok/s with preload",
                           "with ÷ without"], body, ["l", "l", "l", "r", "r", "r"])


def acceptance_by_method(rows: Sequence[dict]) -> dict[tuple[str, str], dict[str, Any]]:
    """(workload, method) -> acceptance summed over scenarios."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["status"] == "ok" and r["spec"]["drafts"] > 0:
            groups.setdefault((r["workload"], r["method"]), []).append(r["spec"])
    out = {}
    for key, items in groups.items():
        spec = sum_counters(items)
        out[key] = {"rates": acceptance_per_position(spec["accepted_per_pos"], spec["drafts"]),
                    "mean_acceptance_length": mean_acceptance_length(spec["drafts"], spec["accepted"])}
    return out


def acceptance_table(rows: Sequence[dict], positions: int = TABLE_POSITIONS) -> str:
    """Acceptance rate per draft position (first ``positions``), all scenarios pooled."""
    headers = ["workload", "method", "mean acc. len"] + [f"pos {i + 1}" for i in range(positions)]
    body = []
    for (w, m), a in acceptance_by_method(rows).items():
        rates = a["rates"]
        body.append([w, m, fmt(a["mean_acceptance_length"])]
                    + [fmt(rates[i]) if i < len(rates) else DASH for i in range(positions)])
    if not body:
        return "_(no speculative method produced drafts)_"
    return markdown_table(headers, body, ["l", "l", "r"] + ["r"] * positions)


def budget_table(rows: Sequence[dict]) -> Optional[str]:
    """What the shared draft budget did per cell (this package's methods):
    tokens the method proposed, kept after the cut, accepted of those, over
    all repeats; None when no row carries budget counters."""
    body = []
    for r in rows:
        b = r.get("draft_budget")
        if r["status"] != "ok" or not b:
            continue
        proposed, kept, acc = b["proposed_tokens"], b["kept_tokens"], b["accepted_tokens"]
        body.append([r["workload"], r["scenario"], r["method"],
                     "on" if b.get("enabled", True) else "off",
                     str(int(proposed)), f"{int(kept)} ({fmt_pct(kept / proposed if proposed else None, 0)})",
                     str(int(acc)), fmt_pct(acc / kept if kept else None, 0),
                     fmt_pct(b["rows_emptied"] / b["rows"] if b["rows"] else None, 0),
                     fmt(b.get("price"), 3)])
    if not body:
        return None
    return markdown_table(["workload", "scenario", "method", "budget", "proposed tokens",
                           "kept (share)", "accepted", "accepted ÷ kept", "rows emptied",
                           "price"], body, ["l", "l", "l", "l"] + ["r"] * 6)


BUDGET_NOTE = ("proposed = tokens the method drafted; kept = what the draft budget left after "
               "its cut (budget off: all of them, up to num_speculative_tokens); accepted = of "
               "the kept tokens, what the engine accepted (the budget's own count: drafts of "
               "each request's last step are not reported back); all summed over repeats. "
               "rows emptied = rows whose whole draft was cut; price = the acceptance "
               "probability a token needed at the end of the cell (median over repeats).")


def scorer_table(rows: Sequence[dict]) -> str:
    """Lossy scorers: accepted draft tokens by the standard rule and only by the scorer."""
    headers = ["workload", "scenario", "method", "drafted", "accepted (standard rule)",
               "accepted (scorer only)", "lossy share of accepted", "lossy rows", "errors"]
    body = []
    for r in rows:
        sc = r.get("scorer")
        if not sc:
            continue
        acc = sc["standard_accepted"] + sc["scorer_accepted"]
        body.append([r["workload"], r["scenario"], r["method"], str(sc["drafted_tokens"]),
                     str(sc["standard_accepted"]), str(sc["scorer_accepted"]),
                     fmt_pct(sc["scorer_accepted"] / acc) if acc else DASH,
                     f"{sc['lossy_rows']}/{sc['lossy_rows'] + sc['lossless_rows']}",
                     str(sc["errors"])])
    return markdown_table(headers, body, ["l", "l", "l"] + ["r"] * 6) if body else ""


def mismatch_lines(rows: Sequence[dict], baseline: str = BASELINE, limit: int = 12,
                   lossy: bool = False) -> list[str]:
    """One line per (method, workload, scenario) whose greedy outputs differ from
    the baseline; ``lossy`` selects the lossy methods' lines instead."""
    out = []
    for r in rows:
        mm = r.get("mismatches") or []
        if not mm or (not r.get("lossless", True)) != lossy:
            continue
        shown = ", ".join(
            f"#{m['prompt']}@{m['position']}" + (f"(r{m['repeat']})" if r["repeats_ok"] > 1 else "")
            for m in mm[:limit])
        more = f" … +{len(mm) - limit} more" if len(mm) > limit else ""
        what = "repeat 0 of itself" if r["method"] == baseline else baseline
        out.append(f"{r['method']} / {r['workload']} / {r['scenario']}: {len(mm)} of "
                   f"{r['compared']} outputs differ from {what} (prompt#@first differing "
                   f"position: {shown}{more})")
    return out


def render_report(settings: dict[str, Any], rows: Sequence[dict], runs: Sequence[dict],
                  notes: Sequence[str] = (), env_info: Optional[dict] = None,
                  baseline: str = BASELINE) -> str:
    """The whole Markdown report; ``settings`` are the lines of the header."""
    env_info = env_info or {}
    lines = ["# Speculative decoding benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in settings.items()]
    if env_info:
        lines.append("- environment: " + ", ".join(f"{k} {v}" for k, v in env_info.items()))
    lossy = sorted({r["method"] for r in rows if not r.get("lossless", True)})
    if lossy:
        lines += ["", f"**LOSSY methods: {', '.join(lossy)}** — their outputs may differ from the "
                  "target model's; read their task score next to their speed."]
    if any(r.get("label", "").endswith(PRELOAD_SUFFIX) for r in runs):
        lines += ["", "## CPU preload: Intel OpenMP + tcmalloc, with ÷ without", "",
                  preload_table(runs), "",
                  "tok/s: median over repeats; with ÷ without: the two runs of the same method "
                  "in the same repeat, median (min–max) over repeats. Without = vLLM's default "
                  "(it preloads torch's libgomp itself)."]
    lines += ["", f"## Speedup over `{baseline}` (median; τ = mean acceptance length)", "",
              speedup_pivot(rows, baseline), ""]
    lossy_table = scorer_table(rows)
    if lossy_table:
        lines += ["## Lossy scorers: what they accepted", "", lossy_table, "",
                  "Counted by the scorer in the engine (drafted = real draft tokens, a "
                  "reflective row's probe and copy not counted); Δ in the table above = the "
                  "method's task score minus the baseline's, paired by prompt.", ""]
    lines += ["## All measurements", "",
              main_table(rows, baseline), "",
              "tok/s = output tokens / wall time (offline: of the `llm.generate` calls; online: of "
              "the whole load at that concurrency), median over repeats; speedup = tok/s ÷ tok/s of "
              f"`{baseline}` in the same repeat and scenario (median); mean acc. len = 1 + accepted / "
              "drafts (tokens per verification step); draft acc. rate = accepted / drafted tokens; "
              "draft ms/step = time in the runner's drafting call per step that drafts (the draft "
              "model's forward included; for this package's methods also reading the target's top-k), "
              "% wall = its share of the wall time (offline only); TTFT = "
              "time to first token, TPOT = (latency − TTFT) / (tokens − 1), ITL = gap between "
              "streamed chunks (one chunk may carry several accepted tokens); task score: HumanEval "
              "pass@1 (tests executed) or math exact match.",
              "", f"## Acceptance rate per draft position (first {TABLE_POSITIONS}, scenarios pooled)",
              "", acceptance_table(rows), ""]
    budget = budget_table(rows)
    if budget:
        lines += ["## Draft budget per cell (tokens before and after the cut)", "", budget, "",
                  BUDGET_NOTE, ""]
    lines += ["## Greedy equality", "", EQUALITY_NOTE, ""]
    mm = mismatch_lines(rows, baseline)
    if mm:
        lines += ["**WARNING: greedy outputs of lossless methods differ:**", ""]
        lines += [f"- {m}" for m in mm] + [""]
    elif any(r["compared"] for r in rows if r.get("lossless", True)):
        lines += [f"All compared outputs of lossless methods are identical to `{baseline}`.", ""]
    else:
        lines += [f"Not checked (`{baseline}` not run or failed).", ""]
    mm_lossy = mismatch_lines(rows, baseline, lossy=True)
    if mm_lossy:
        lines += ["Lossy methods (differences expected):", ""] + [f"- {m}" for m in mm_lossy] + [""]
    fails = failures(runs)
    if fails or notes:
        lines += ["## Notes and problems", ""]
        lines += [f"- {s}" for s in notes]
        for f in fails:
            lines.append(f"- method `{f['label']}` failed in repeat {f['repeat']}: {f.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_speedup(rows: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
                 scenarios: Sequence[str], path: Path, baseline: str = BASELINE) -> None:
    """Bars: speedup per workload and method, one row per scenario (stacked, so
    many workloads stay readable), one legend beside the panels."""
    plt = _pyplot()
    spec_methods = [m for m in methods if m != baseline]
    by = {(r["workload"], r["scenario"], r["method"]): r for r in rows}
    n = max(1, len(spec_methods))
    width = 0.8 / n
    panel_w = max(6.0, 0.45 * len(workloads) * n + 2)
    fig, axes = plt.subplots(len(scenarios), 1, figsize=(panel_w + 2.2, 3.4 * len(scenarios) + 0.8),
                             sharey=True, squeeze=False)
    xs = list(range(len(workloads)))
    top = 1.0
    for ax, scen in zip(axes[:, 0], scenarios):
        for j, m in enumerate(spec_methods):
            vals, lo_err, hi_err = [], [], []
            for w in workloads:
                r = by.get((w, scen, m))
                v = r["speedup"] if r and r["status"] == "ok" and r["speedup"] is not None else float("nan")
                vals.append(v)
                if r and r.get("speedup_min") is not None and math.isfinite(v):
                    lo_err.append(v - r["speedup_min"])
                    hi_err.append(r["speedup_max"] - v)
                else:
                    lo_err.append(0.0)
                    hi_err.append(0.0)
            pos = [x - 0.4 + width * (j + 0.5) for x in xs]
            yerr = [lo_err, hi_err] if any(lo_err) or any(hi_err) else None
            bars = ax.bar(pos, vals, width, label=m, yerr=yerr, capsize=3)
            for b, v, up in zip(bars, vals, hi_err):
                x = b.get_x() + b.get_width() / 2
                if math.isfinite(v):
                    top = max(top, v + up)
                    ax.annotate(f"{v:.2f}", (x, v + up), ha="center", va="bottom", fontsize=7,
                                xytext=(0, 2), textcoords="offset points")
                else:
                    ax.annotate("n/a", (x, 0), ha="center", va="bottom", fontsize=7)
        ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=f"{baseline} (1.0)")
        ax.set_xticks(xs)
        ax.set_xticklabels(workloads)
        ax.set_title(scen, fontsize=10)
        ax.set_ylabel("speedup")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylim(0, top * 1.12)  # shared y: room for the value labels
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle(f"Speedup over {baseline} in output tok/s (median over repeats; whiskers: min–max)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_acceptance(rows: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
                    path: Path, baseline: str = BASELINE) -> None:
    """Lines: acceptance rate per draft position, one panel per workload."""
    plt = _pyplot()
    acc = acceptance_by_method(rows)
    n = max(1, len(workloads))
    ncols = min(3, n)  # wrap: five workloads in one row are too small to read
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 4.6 * ncols), 3.8 * nrows),
                             sharey=True, squeeze=False)
    for ax in axes.flat[len(workloads):]:
        ax.set_visible(False)
    for ax, w in zip(axes.flat, workloads):
        drew = False
        for m in methods:
            a = acc.get((w, m))
            if m == baseline or not a or not a["rates"]:
                continue
            ax.plot(range(1, len(a["rates"]) + 1), a["rates"], marker="o", markersize=3,
                    label=f"{m} (τ={fmt(a['mean_acceptance_length'])})")
            drew = True
        ax.set_title(w)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if drew:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no drafts", ha="center", va="center", transform=ax.transAxes)
    for row in axes:
        row[0].set_ylabel("acceptance rate")
    fig.suptitle("Acceptance rate per draft position (τ = mean acceptance length)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


LATENCY_PANELS = (("tpot_ms_p50", "TPOT p50 (ms per output token)"), ("ttft_ms_p50", "TTFT p50 (ms)"))


def plot_latency(rows: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
                 scenarios: Sequence[str], path: Path) -> bool:
    """Bars (lower is better): online TPOT and TTFT per workload and method, one
    column per concurrency level; the baseline is drawn too. Returns False (no
    file) when no scenario has latencies, i.e. an offline-only run."""
    by = {(r["workload"], r["scenario"], r["method"]): r for r in rows}
    scen = [s for s in scenarios if any(by.get((w, s, m), {}).get("ttft_ms_p50") is not None
                                        for w in workloads for m in methods)]
    if not scen:
        return False
    plt = _pyplot()
    n = max(1, len(methods))
    width = 0.8 / n
    panel_w = max(5.0, 0.5 * len(workloads) * n + 2)
    fig, axes = plt.subplots(len(LATENCY_PANELS), len(scen), figsize=(panel_w * len(scen), 7.5),
                             squeeze=False)
    xs = list(range(len(workloads)))
    for col, sc in enumerate(scen):
        for row_i, (key, label) in enumerate(LATENCY_PANELS):
            ax = axes[row_i][col]
            for j, m in enumerate(methods):
                vals = []
                for w in workloads:
                    r = by.get((w, sc, m))
                    v = r.get(key) if r and r["status"] == "ok" else None
                    vals.append(float("nan") if v is None else v)
                pos = [x - 0.4 + width * (j + 0.5) for x in xs]
                bars = ax.bar(pos, vals, width, label=m)
                for b, v in zip(bars, vals):
                    if math.isfinite(v):
                        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center",
                                    va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
            ax.set_xticks(xs)
            ax.set_xticklabels(workloads)
            ax.set_title(f"{sc}: {label}", fontsize=10)
            ax.set_ylim(0, ax.get_ylim()[1] * 1.08)  # room for the value labels
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Online latency per method (median over repeats; lower is better)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return True


def settings_lines(cfg: Any, model_path: str) -> dict[str, str]:
    """The report header of a :class:`runner.BenchConfig`."""
    out = {"model": f"`{cfg.model}`" + (f" ({model_path})" if model_path and model_path != cfg.model else ""),
           "generation": f"greedy (temperature 0), max_tokens {cfg.max_tokens}, dtype {cfg.dtype}, "
                         f"k (num_speculative_tokens) = {cfg.k} for every method"
                         + (f" (vLLM draft_model: {cfg.draft_model_k})"
                            if getattr(cfg, "draft_model_k", None) else "")
                         + f", seed {cfg.seed}",
           "prompts": f"{cfg.num_prompts} per workload and scenario (each scenario its own prompts, "
                      "so cross-request caches never see a prompt twice)",
           "repeats": f"{cfg.repeats} (methods interleaved, rotated order per repeat)"}
    if cfg.draft_model:
        out["draft model"] = f"`{cfg.draft_model}`"
    for m in cfg.methods:
        if m.kind == "plugin":
            out[f"{m.label} settings"] = f"`{json.dumps({**m.settings, **cfg.plugin_config})}` ({m.source})"
    return out
