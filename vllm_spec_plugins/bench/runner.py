"""``vllm-spec-plugins bench``: speculative-decoding methods side by side.

Every (repeat, method) pair runs in its own worker subprocess
(``python -m vllm_spec_plugins.bench.runner --worker SPEC.json``) with its own
``LLM`` engine, because the speculative config is fixed per engine and two
engines must never share the machine's memory. Within a repeat the methods run
in a rotated order, so slow drift of the machine does not favour one method.

A worker builds the engine, renders each workload's conversations with the
tokenizer's chat template, runs one untimed warm-up generate, then times
``llm.generate`` per workload (greedy) and records the output token ids and the
spec-decode counters (``llm.get_metrics()``, as deltas) -- plus, for this
package's proposers, the drafter's own time (``drafter_snapshot``).

The parent aggregates: output tokens/s (median and spread over repeats),
speedup over ``none`` (paired per repeat), mean acceptance length, acceptance
rate per draft position, proposer ms per step, and greedy equality against
``none``. It writes ``results.md`` (also printed), ``results.json``,
``speedup.png`` and ``acceptance.png`` under ``--out``.

The parent process imports no vLLM; everything above the "worker" section is
plain Python (and unit-tested).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

BASELINE = "none"
BUILTIN_METHODS = ("none", "ngram", "suffix", "suffix_tree")
PLUGIN_PREFIX = "plugin:"
DEFAULT_METHODS = "none,ngram,suffix,suffix_tree"
DEFAULT_WORKLOADS = "repetitive,code,chat"
NGRAM_PROMPT_LOOKUP_MIN = 2
NGRAM_PROMPT_LOOKUP_MAX = 5
MAX_MODEL_LEN = 4096
TABLE_POSITIONS = 8          # acceptance positions shown in the table
STDERR_TAIL_LINES = 20
WARMUP_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
WARMUP_MAX_TOKENS = 8

# Spec-decode metric names as ``llm.get_metrics()`` reports them.
M_DRAFTS = "vllm:spec_decode_num_drafts"
M_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
M_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
M_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"

WORKER_ENV = {
    # drafter_snapshot travels to the workers as a pickled callable.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    # Only this package's vLLM plugin: arctic_inference registers one too, which
    # must stay out (vLLM's built-in ``suffix`` imports arctic_inference directly).
    "VLLM_PLUGINS": "vllm_spec_plugins",
    "PYTHONUNBUFFERED": "1",
}

EQUALITY_NOTE = (
    "Greedy equality compares each method's output token ids with `none`, prompt by "
    "prompt. In bfloat16, verifying k+1 tokens at once changes kernel shapes and "
    "rounding, so near-ties in the argmax can flip and outputs may diverge without a "
    "bug; float32 (`--dtype float32`) is the strict check."
)


# ==========================================================================
# Arguments
# ==========================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options (cli.py calls this)."""
    p.add_argument("--model", default="smollm2-135m",
                   help="known model name (see `vllm-spec-plugins models list`) or a "
                        "local Hugging Face model directory (default: smollm2-135m)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of: none (no speculation), ngram (vLLM prompt lookup, "
                        f"n={NGRAM_PROMPT_LOOKUP_MIN}..{NGRAM_PROMPT_LOOKUP_MAX}), suffix "
                        "(vLLM SuffixDecoding, needs arctic_inference), suffix_tree (this "
                        "plugin), plugin:<method> (any method of this plugin's registry, or "
                        f"plugin:package.module:Class). Default: {DEFAULT_METHODS}")
    p.add_argument("--plugin-config", default=None, metavar="JSON",
                   help="extra settings for the plugin methods, a JSON object, e.g. "
                        "'{\"max_tree_depth\": 32}'")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help="comma list of code, chat, repetitive, or paths to .jsonl files "
                        f"(default: {DEFAULT_WORKLOADS})")
    p.add_argument("--num-prompts", type=int, default=16, help="prompts per workload (default 16)")
    p.add_argument("--max-tokens", type=int, default=256, help="max output tokens per prompt (default 256)")
    p.add_argument("--k", type=int, default=8,
                   help="num_speculative_tokens, the same for every method (default 8)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="prompts per llm.generate call (default: all of a workload at once; "
                        "1 = one prompt per call)")
    p.add_argument("--repeats", type=int, default=1, help="runs per method (default 1)")
    p.add_argument("--dtype", default="bfloat16",
                   help="model dtype (default bfloat16; float32 for strict greedy equality)")
    p.add_argument("--seed", type=int, default=0, help="workload sampling and engine seed (default 0)")
    p.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    p.add_argument("--kv-cache-gb", type=float, default=2.0,
                   help="KV cache size per engine in GiB (default 2)")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="kill a method's worker after this long (default: no limit)")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method. ``label`` is what the user wrote."""

    label: str
    kind: str                            # "none" | "ngram" | "suffix" | "plugin"
    plugin_method: Optional[str] = None  # registry method for kind == "plugin"


@dataclass
class BenchConfig:
    model: str
    methods: list[MethodSpec]
    workloads: list[str]
    num_prompts: int
    max_tokens: int
    k: int
    batch_size: Optional[int]
    repeats: int
    dtype: str
    seed: int
    out: str
    kv_cache_gb: float
    plugin_config: dict[str, Any] = field(default_factory=dict)
    worker_timeout: Optional[float] = None

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gb * (1 << 30))


def _split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in (text or "").split(",")]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"--{what}: empty list")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise ValueError(f"--{what}: listed more than once: {', '.join(dup)}")
    return items


def parse_plugin_config(text: Optional[str]) -> dict[str, Any]:
    """``--plugin-config`` JSON -> dict (must be an object without ``method``)."""
    if text is None or not text.strip():
        return {}
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--plugin-config: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"--plugin-config: expected a JSON object, got {type(obj).__name__}")
    if "method" in obj:
        raise ValueError("--plugin-config: 'method' is chosen with --methods "
                         "(suffix_tree or plugin:<method>), not in --plugin-config")
    return obj


def _registry_methods() -> list[str]:
    from vllm_spec_plugins.registry import METHODS

    return sorted(METHODS)


def parse_methods(text: str, known_plugins: Optional[Iterable[str]] = None) -> list[MethodSpec]:
    """``--methods`` -> specs. Raises ValueError naming the bad entry."""
    known_plugins = sorted(known_plugins if known_plugins is not None else _registry_methods())
    specs = []
    for item in _split_list(text, "methods"):
        if item in ("none", "ngram", "suffix"):
            specs.append(MethodSpec(item, item))
        elif item == "suffix_tree":
            specs.append(MethodSpec(item, "plugin", "suffix_tree"))
        elif item.startswith(PLUGIN_PREFIX):
            name = item[len(PLUGIN_PREFIX):]
            if not name:
                raise ValueError(f"--methods: {item!r} names no plugin method; "
                                 f"known plugin methods: {', '.join(known_plugins)}")
            if name not in known_plugins and ":" not in name:
                raise ValueError(f"--methods: unknown plugin method {name!r} in {item!r}; "
                                 f"known plugin methods: {', '.join(known_plugins)} "
                                 "(or plugin:package.module:ClassName)")
            specs.append(MethodSpec(item, "plugin", name))
        else:
            raise ValueError(f"--methods: unknown method {item!r}; expected one of "
                             f"{', '.join(BUILTIN_METHODS)} or plugin:<method> "
                             f"(plugin methods: {', '.join(known_plugins)})")
    return specs


def parse_workloads(text: str, known: Optional[Iterable[str]] = None) -> list[str]:
    """``--workloads`` -> list of names / .jsonl paths. Raises ValueError."""
    if known is None:
        from vllm_spec_plugins.bench.workloads import WORKLOADS

        known = WORKLOADS
    known = sorted(known)
    items = _split_list(text, "workloads")
    for item in items:
        if item in known:
            continue
        if item.endswith(".jsonl"):
            if not os.path.isfile(item):
                raise ValueError(f"--workloads: no such file {item!r}")
            continue
        raise ValueError(f"--workloads: unknown workload {item!r}; expected one of "
                         f"{', '.join(known)} or a path to a .jsonl file")
    return items


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"--{name} must be > 0, got {value}")


def config_from_args(args: argparse.Namespace,
                     known_plugins: Optional[Iterable[str]] = None,
                     known_workloads: Optional[Iterable[str]] = None) -> BenchConfig:
    """Validate the parsed arguments (no engine, no model access)."""
    _positive("num-prompts", args.num_prompts)
    _positive("max-tokens", args.max_tokens)
    _positive("k", args.k)
    _positive("batch-size", args.batch_size, allow_none=True)
    _positive("repeats", args.repeats)
    _positive("kv-cache-gb", args.kv_cache_gb)
    _positive("worker-timeout", getattr(args, "worker_timeout", None), allow_none=True)
    if args.max_tokens >= MAX_MODEL_LEN:
        raise ValueError(f"--max-tokens must be < max_model_len {MAX_MODEL_LEN}, got {args.max_tokens}")
    dtypes = ("auto", "bfloat16", "float16", "float32", "half", "float")
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype: expected one of {', '.join(dtypes)}, got {args.dtype!r}")
    return BenchConfig(
        model=args.model,
        methods=parse_methods(args.methods, known_plugins),
        workloads=parse_workloads(args.workloads, known_workloads),
        num_prompts=args.num_prompts, max_tokens=args.max_tokens, k=args.k,
        batch_size=args.batch_size, repeats=args.repeats, dtype=args.dtype,
        seed=args.seed, out=args.out, kv_cache_gb=args.kv_cache_gb,
        plugin_config=parse_plugin_config(args.plugin_config),
        worker_timeout=getattr(args, "worker_timeout", None),
    )


def filter_available(methods: Sequence[MethodSpec], has_arctic: bool) -> tuple[list[MethodSpec], list[str]]:
    """Drop methods that cannot run here; return (kept, warning lines)."""
    kept, warnings = [], []
    for m in methods:
        if m.kind == "suffix" and not has_arctic:
            warnings.append(f"warning: skipping method {m.label!r}: vLLM's suffix decoding needs "
                            "the arctic_inference package, which is not importable "
                            "(see scripts/install_arctic_inference.sh)")
            continue
        kept.append(m)
    return kept, warnings


def has_arctic_inference() -> bool:
    try:
        return importlib.util.find_spec("arctic_inference") is not None
    except (ImportError, ValueError):
        return False


def engine_kwargs(method: MethodSpec, *, model: str, dtype: str, seed: int, k: int,
                  kv_cache_bytes: int, plugin_config: Optional[dict] = None) -> dict[str, Any]:
    """The ``LLM(...)`` keyword arguments of one method's engine."""
    kw: dict[str, Any] = dict(model=model, dtype=dtype, kv_cache_memory_bytes=int(kv_cache_bytes),
                              max_model_len=MAX_MODEL_LEN, disable_log_stats=False, seed=seed)
    if method.kind == "none":
        pass
    elif method.kind == "ngram":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                    "prompt_lookup_min": NGRAM_PROMPT_LOOKUP_MIN,
                                    "prompt_lookup_max": NGRAM_PROMPT_LOOKUP_MAX}
    elif method.kind == "suffix":
        kw["speculative_config"] = {"method": "suffix", "num_speculative_tokens": k}
    elif method.kind == "plugin":
        from vllm_spec_plugins.integration import CONFIG_KEY, speculative_config

        kw["speculative_config"] = speculative_config(k)
        kw["additional_config"] = {CONFIG_KEY: {"method": method.plugin_method,
                                                **(plugin_config or {})}}
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    return kw


def rotated_order(items: Sequence[Any], repeat: int) -> list[Any]:
    """Repeat ``r`` runs the methods starting at index ``r mod n``."""
    items = list(items)
    if not items:
        return []
    s = repeat % len(items)
    return items[s:] + items[:s]


def run_schedule(methods: Sequence[Any], repeats: int) -> list[tuple[int, Any]]:
    return [(r, m) for r in range(repeats) for m in rotated_order(methods, r)]


def resolve_model_path(name_or_path: str) -> str:
    """Known model name -> provisioned dir; else an existing local HF directory."""
    from vllm_spec_plugins.models import MODELS, resolve_model

    if name_or_path in MODELS:
        return resolve_model(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"--model: {str(p)!r} is a directory without config.json, "
                             "not a Hugging Face model directory")
        return str(p.resolve())
    try:  # a hub id that is already in the local Hugging Face cache
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name_or_path, "config.json"), str):
            return name_or_path
    except Exception:
        pass
    raise ValueError(f"--model: {name_or_path!r} is neither a known model "
                     f"({', '.join(sorted(MODELS))}) nor a local model directory")


# ==========================================================================
# Metric math (pure)
# ==========================================================================
def spec_counters(metrics: Iterable[Any]) -> dict[str, Any]:
    """Spec-decode counters out of ``llm.get_metrics()`` (summed over label sets).

    Returns ``{"drafts", "draft_tokens", "accepted": int, "accepted_per_pos": list}``;
    a counter that is absent (no speculation) is 0 / []."""
    out: dict[str, Any] = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
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
    """``after - before`` of two :func:`spec_counters` results."""
    b_pos, a_pos = list(before.get("accepted_per_pos") or []), list(after.get("accepted_per_pos") or [])
    n = max(len(a_pos), len(b_pos))
    b_pos += [0] * (n - len(b_pos))
    a_pos += [0] * (n - len(a_pos))
    return {"drafts": after["drafts"] - before["drafts"],
            "draft_tokens": after["draft_tokens"] - before["draft_tokens"],
            "accepted": after["accepted"] - before["accepted"],
            "accepted_per_pos": [a - b for a, b in zip(a_pos, b_pos)]}


def sum_counters(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    total = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
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


def drafter_delta(before: Optional[dict], after: Optional[dict]) -> Optional[dict[str, Any]]:
    """Difference of two ``drafter_snapshot`` dicts (numeric counters only)."""
    if before is None or after is None:
        return None
    keys = ("steps", "rows", "drafted_tokens", "propose_seconds", "errors")
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys if k in after}


def proposer_ms_per_step(propose_seconds: float, steps: int) -> Optional[float]:
    return None if steps <= 0 else 1000.0 * propose_seconds / steps


def median_spread(values: Sequence[float]) -> tuple[Optional[float], Optional[float], Optional[float]]:
    """(median, min, max); Nones for an empty list."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None, None, None
    return statistics.median(vals), min(vals), max(vals)


def first_difference(a: Sequence[int], b: Sequence[int]) -> Optional[int]:
    """Index of the first differing token (length difference counts); None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare_outputs(reference: Sequence[Sequence[int]],
                    other: Sequence[Sequence[int]]) -> list[tuple[int, int]]:
    """Per-prompt greedy equality: list of (prompt index, first differing position)."""
    if len(reference) != len(other):
        raise ValueError(f"output counts differ: {len(reference)} vs {len(other)}")
    out = []
    for i, (a, b) in enumerate(zip(reference, other)):
        d = first_difference(a, b)
        if d is not None:
            out.append((i, d))
    return out


# ==========================================================================
# Aggregation (pure)
# ==========================================================================
def _ok_runs(runs: Sequence[dict], label: str) -> list[dict]:
    return [r for r in runs if r.get("label") == label and r.get("status") == "ok"]


def summarize(runs: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
              baseline: str = BASELINE) -> list[dict[str, Any]]:
    """One row per (workload, method) out of the workers' result dicts.

    A run is ``{"label", "repeat", "status": "ok"|"failed", "workloads": {name: {
    "wall_s", "output_tokens", "token_ids", "spec", "drafter"}}}``."""
    rows = []
    base_by_repeat = {r["repeat"]: r for r in _ok_runs(runs, baseline)}
    for wname in workloads:
        for label in methods:
            all_runs = [r for r in runs if r.get("label") == label]
            ok = [r for r in _ok_runs(runs, label) if wname in r.get("workloads", {})]
            row: dict[str, Any] = {"workload": wname, "method": label,
                                   "repeats_ok": len(ok), "repeats_total": len(all_runs),
                                   "status": "ok" if ok else "failed"}
            tps, speedups = [], []
            spec_items, prop_s, prop_steps, wall_total = [], 0.0, 0, 0.0
            has_drafter = False
            identical = compared = 0
            mismatches: list[dict[str, Any]] = []
            for r in sorted(ok, key=lambda r: r["repeat"]):
                w = r["workloads"][wname]
                t = w["output_tokens"] / w["wall_s"] if w["wall_s"] > 0 else None
                tps.append(t)
                wall_total += w["wall_s"]
                spec_items.append(w.get("spec") or {})
                if w.get("drafter"):
                    has_drafter = True
                    prop_s += float(w["drafter"].get("propose_seconds", 0.0))
                    prop_steps += int(w["drafter"].get("steps", 0))
                # the baseline of the same repeat (speedup is paired per repeat)
                base = base_by_repeat.get(r["repeat"])
                bw = base["workloads"].get(wname) if base else None
                if bw is not None and t is not None and bw["wall_s"] > 0 and bw["output_tokens"] > 0:
                    speedups.append(t / (bw["output_tokens"] / bw["wall_s"]))
                # greedy equality: against the same repeat's baseline, else the first one;
                # the baseline itself is compared with its first repeat (determinism).
                if label == baseline:
                    ref = base_by_repeat[min(base_by_repeat)] if base_by_repeat else None
                    if ref is r:
                        ref = None
                else:
                    ref = base or (base_by_repeat[min(base_by_repeat)] if base_by_repeat else None)
                rw = ref["workloads"].get(wname) if ref else None
                if rw is not None and "token_ids" in w and "token_ids" in rw:
                    diffs = compare_outputs(rw["token_ids"], w["token_ids"])
                    compared += len(w["token_ids"])
                    identical += len(w["token_ids"]) - len(diffs)
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
            row["identical"] = identical if compared else None
            row["compared"] = compared if compared else None
            row["mismatches"] = mismatches
            rows.append(row)
    return rows


def failures(runs: Sequence[dict]) -> list[dict]:
    return [r for r in runs if r.get("status") != "ok"]


# ==========================================================================
# Report (pure)
# ==========================================================================
DASH = "–"


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
    return s + (" !" if row["identical"] < row["compared"] else "")


def main_table(rows: Sequence[dict], baseline: str = BASELINE) -> str:
    headers = ["workload", "method", "tok/s (median)", "min–max", "speedup", "mean acc. len",
               "draft acc. rate", "proposer ms/step", "proposer % wall", f"identical to {baseline}"]
    body = []
    for r in rows:
        tps, spread = _tps_cell(r)
        ok = r["status"] == "ok"
        label = r["method"]
        if ok and r["repeats_ok"] < r["repeats_total"]:
            label += f" ({r['repeats_ok']}/{r['repeats_total']} runs ok)"
        body.append([r["workload"], label,
                     tps, spread, _speedup_cell(r, baseline),
                     fmt(r["mean_acceptance_length"]) if ok else DASH,
                     fmt_pct(r["draft_acceptance_rate"]) if ok else DASH,
                     fmt(r["proposer_ms_per_step"], 3) if ok else DASH,
                     fmt_pct(r["proposer_share"]) if ok else DASH,
                     _identical_cell(r, baseline)])
    return markdown_table(headers, body, ["l", "l", "r", "r", "r", "r", "r", "r", "r", "r"])


def acceptance_table(rows: Sequence[dict], positions: int = TABLE_POSITIONS) -> str:
    """Acceptance rate per draft position (first ``positions``) of speculative rows."""
    headers = ["workload", "method"] + [f"pos {i + 1}" for i in range(positions)]
    body = []
    for r in rows:
        rates = r.get("acceptance_per_position") or []
        if r["status"] != "ok" or not rates:
            continue
        cells = [fmt(rates[i]) if i < len(rates) else DASH for i in range(positions)]
        body.append([r["workload"], r["method"]] + cells)
    if not body:
        return "_(no speculative method produced drafts)_"
    return markdown_table(headers, body, ["l", "l"] + ["r"] * positions)


def mismatch_lines(rows: Sequence[dict], baseline: str = BASELINE, limit: int = 12) -> list[str]:
    """One line per (method, workload) whose greedy outputs differ from the baseline."""
    out = []
    for r in rows:
        mm = r.get("mismatches") or []
        if not mm:
            continue
        shown = ", ".join(
            f"#{m['prompt']}@tok{m['position']}" + (f"(r{m['repeat']})" if r["repeats_ok"] > 1 else "")
            for m in mm[:limit])
        more = f" … +{len(mm) - limit} more" if len(mm) > limit else ""
        what = "repeat 0 of itself" if r["method"] == baseline else baseline
        out.append(f"{r['method']} / {r['workload']}: {len(mm)} of {r['compared']} outputs differ "
                   f"from {what} (prompt#@first differing token: {shown}{more})")
    return out


def render_report(cfg: BenchConfig, rows: Sequence[dict], runs: Sequence[dict],
                  skipped: Sequence[str] = (), model_path: str = "",
                  env_info: Optional[dict] = None, baseline: str = BASELINE) -> str:
    env_info = env_info or {}
    batch = "all prompts per generate call" if cfg.batch_size is None else f"{cfg.batch_size} per generate call"
    lines = ["# Speculative decoding benchmark", "",
             f"- model: `{cfg.model}`" + (f" ({model_path})" if model_path and model_path != cfg.model else ""),
             f"- dtype {cfg.dtype}, k (num_speculative_tokens) = {cfg.k}, max_tokens {cfg.max_tokens}, "
             f"{cfg.num_prompts} prompts per workload, {batch}, {cfg.repeats} repeat(s), seed {cfg.seed}, "
             "greedy (temperature 0)",
             f"- ngram: prompt_lookup_min {NGRAM_PROMPT_LOOKUP_MIN}, max {NGRAM_PROMPT_LOOKUP_MAX}"
             + (f"; plugin settings: `{json.dumps(cfg.plugin_config)}`" if cfg.plugin_config else "")]
    if env_info:
        lines.append("- " + ", ".join(f"{k} {v}" for k, v in env_info.items()))
    lines += ["", main_table(rows, baseline), "",
              f"tok/s = output tokens / wall time of the `llm.generate` calls, median over repeats; "
              f"speedup = tok/s ÷ tok/s of `{baseline}` in the same repeat (median); mean acc. len = "
              "1 + accepted / drafts (tokens per verification step); draft acc. rate = accepted / "
              "drafted tokens; proposer = this plugin's drafter time (vLLM's built-ins do not report it).",
              "", f"## Acceptance rate per draft position (first {TABLE_POSITIONS})", "",
              acceptance_table(rows), "", "## Greedy equality", "", EQUALITY_NOTE, ""]
    mm = mismatch_lines(rows, baseline)
    if mm:
        lines += ["**WARNING: greedy outputs differ:**", ""] + [f"- {m}" for m in mm] + [""]
    elif any(r["compared"] for r in rows):
        lines += [f"All compared outputs are identical to `{baseline}`.", ""]
    else:
        lines += [f"Not checked (`{baseline}` not run or failed).", ""]
    fails = failures(runs)
    if fails or skipped:
        lines += ["## Problems", ""]
        lines += [f"- {s}" for s in skipped]
        for f in fails:
            lines.append(f"- method `{f['label']}` failed in repeat {f['repeat']}: {f.get('error', '')}")
        lines.append("")
    return "\n".join(lines)


# ==========================================================================
# Plots
# ==========================================================================
def plot_speedup(rows: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
                 path: Path, baseline: str = BASELINE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec_methods = [m for m in methods if m != baseline]
    by = {(r["workload"], r["method"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(max(7.5, 0.8 * len(workloads) * max(1, len(spec_methods)) + 3), 4.5))
    n = max(1, len(spec_methods))
    width = 0.8 / n
    xs = list(range(len(workloads)))
    for j, m in enumerate(spec_methods):
        vals, lo_err, hi_err = [], [], []
        for w in workloads:
            r = by.get((w, m))
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
            if math.isfinite(v):
                ax.annotate(f"{v:.2f}", (b.get_x() + b.get_width() / 2, v + up), ha="center",
                            va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
            else:
                ax.annotate("n/a", (b.get_x() + b.get_width() / 2, 0), ha="center",
                            va="bottom", fontsize=8)
    ax.axhline(1.0, color="black", linewidth=1, linestyle="--", label=f"{baseline} (1.0)")
    ax.set_xticks(xs)
    ax.set_xticklabels(workloads)
    ax.set_ylabel(f"speedup over {baseline} (output tok/s)")
    ax.set_title("Speedup over no speculation\n(median over repeats; whiskers: min–max)", fontsize=11)
    ax.legend(fontsize=8)
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_acceptance(rows: Sequence[dict], methods: Sequence[str], workloads: Sequence[str],
                    path: Path, baseline: str = BASELINE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["workload"], r["method"]): r for r in rows}
    n = max(1, len(workloads))
    fig, axes = plt.subplots(1, n, figsize=(max(6.5, 4.2 * n), 4.0), sharey=True, squeeze=False)
    for ax, w in zip(axes[0], workloads):
        drew = False
        for m in methods:
            if m == baseline:
                continue
            r = by.get((w, m))
            rates = r.get("acceptance_per_position") if r and r["status"] == "ok" else None
            if not rates:
                continue
            ax.plot(range(1, len(rates) + 1), rates, marker="o", markersize=3,
                    label=f"{m} (τ={fmt(r['mean_acceptance_length'])})")
            drew = True
        ax.set_title(w)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        if drew:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no drafts", ha="center", va="center", transform=ax.transAxes)
    axes[0][0].set_ylabel("acceptance rate (accepted / drafts)")
    fig.suptitle("Acceptance rate per draft position (τ = mean acceptance length)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ==========================================================================
# Parent: orchestration
# ==========================================================================
def _safe_name(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _tail(path: Path, n: int = STDERR_TAIL_LINES) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return lines[-n:]


def last_error_line(lines: Sequence[str]) -> str:
    """The most telling line of a traceback tail: the last ``SomeError: ...`` line,
    else the last non-blank line."""
    pat = re.compile(r"^\s*([A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*)$")
    for line in reversed(lines):
        m = pat.match(line)
        if m:
            return m.group(1).strip()
    for line in reversed(lines):
        if line.strip():
            return line.strip()
    return ""


def _run_worker(spec: dict, run_dir: Path, timeout: Optional[float]) -> dict:
    """Run one (repeat, method) worker subprocess; return its result or a failure."""
    stem = f"r{spec['repeat']}-{_safe_name(spec['method']['label'])}"
    spec_path = run_dir / f"{stem}.spec.json"
    result_path = run_dir / f"{stem}.result.json"
    out_log, err_log = run_dir / f"{stem}.stdout.log", run_dir / f"{stem}.stderr.log"
    result_path.unlink(missing_ok=True)
    spec = dict(spec, result_path=str(result_path))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **WORKER_ENV)
    cmd = [sys.executable, "-m", "vllm_spec_plugins.bench.runner", "--worker", str(spec_path)]
    base = {"label": spec["method"]["label"], "repeat": spec["repeat"],
            "stdout_log": str(out_log), "stderr_log": str(err_log)}
    t0 = time.perf_counter()
    rc: Optional[int]
    with open(out_log, "wb") as fo, open(err_log, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            rc = None
        except KeyboardInterrupt:
            _kill_group(proc)
            raise
    elapsed = time.perf_counter() - t0
    result = None
    if result_path.is_file():
        try:
            result = json.loads(result_path.read_text())
        except json.JSONDecodeError:
            result = None
    if result is not None and result.get("status") == "ok":
        result.update(base, worker_seconds=elapsed, returncode=rc)
        if rc != 0:
            result["note"] = (f"worker exited with code {rc} after writing complete results "
                              "(engine shutdown)")
        return result
    if rc is None:
        error = f"worker timed out after {timeout:g} s"
    elif rc < 0:
        error = f"worker killed by signal {-rc}"
    else:
        error = f"worker exited with code {rc}"
    tail = _tail(err_log) or _tail(out_log)
    cause = last_error_line(_tail(err_log, 200) or tail)
    return dict(base, status="failed", error=error + (f": {cause}" if cause else ""),
                returncode=rc, stderr_tail=tail, worker_seconds=elapsed)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the worker and the engine processes it started (its own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired, PermissionError):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("the benchmark's plots need matplotlib: `pip install matplotlib` "
                           "(or the project's bench extra: `pip install -e .[bench]`)")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def run_from_args(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    methods, skipped = filter_available(cfg.methods, has_arctic_inference())
    for line in skipped:
        print(line, file=sys.stderr)
    if not methods:
        raise RuntimeError("no method left to run (see the warnings above)")
    # Plugin settings are validated here, before any engine starts.
    from vllm_spec_plugins.registry import resolve

    for m in methods:
        if m.kind == "plugin":
            resolve({"method": m.plugin_method, **cfg.plugin_config})
    _require_matplotlib()
    from vllm_spec_plugins.bench.workloads import load_workload

    loaded = []
    for spec in cfg.workloads:
        w = load_workload(spec, cfg.num_prompts, cfg.seed)
        if len(w) == 0:
            raise ValueError(f"workload {spec!r} has no prompts")
        loaded.append(w)
    names = [w.name for w in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"--workloads: two workloads share a name: {names}")
    model_path = resolve_model_path(cfg.model)

    out = Path(cfg.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = [m.label for m in methods]
    if BASELINE not in labels:
        print(f"note: method {BASELINE!r} is not in --methods: no speedup and no greedy "
              "equality check", file=sys.stderr)

    from tqdm import tqdm

    schedule = run_schedule(methods, cfg.repeats)
    runs: list[dict] = []
    bar = tqdm(total=len(schedule), desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)
    t_start = time.time()
    try:
        for repeat, m in schedule:
            bar.set_postfix_str(f"repeat {repeat + 1}/{cfg.repeats} {m.label}")
            spec = {"method": asdict(m), "repeat": repeat, "model": model_path, "dtype": cfg.dtype,
                    "seed": cfg.seed, "k": cfg.k, "max_tokens": cfg.max_tokens,
                    "batch_size": cfg.batch_size, "kv_cache_bytes": cfg.kv_cache_bytes,
                    "plugin_config": cfg.plugin_config,
                    "workloads": [{"name": w.name, "prompts": w.prompts} for w in loaded]}
            res = _run_worker(spec, run_dir, cfg.worker_timeout)
            runs.append(res)
            if res["status"] != "ok":
                msg = [f"error: method {m.label!r} failed (repeat {repeat}): {res['error']}; "
                       f"last lines of its stderr ({res['stderr_log']}):"]
                msg += ["    " + ln for ln in res.get("stderr_tail", [])]
                bar.write("\n".join(msg), file=sys.stderr)
            elif res.get("note"):
                bar.write(f"note: method {m.label!r} (repeat {repeat}): {res['note']}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()

    rows = summarize(runs, labels, names)
    env_info = _env_info(runs)
    report = render_report(cfg, rows, runs, skipped, model_path, env_info)
    print(report)
    (out / "results.md").write_text(report + "\n")
    data = {"config": {**asdict(cfg), "methods": [asdict(m) for m in methods],
                       "model_path": model_path, "max_model_len": MAX_MODEL_LEN,
                       "ngram_prompt_lookup": [NGRAM_PROMPT_LOOKUP_MIN, NGRAM_PROMPT_LOOKUP_MAX]},
            "skipped": list(skipped), "started": t_start, "finished": time.time(),
            "environment": env_info, "summary": rows, "runs": runs,
            "workloads": [{"name": w.name, "meta": w.meta} for w in loaded]}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=_json_default))
    try:
        plot_speedup(rows, labels, names, out / "speedup.png")
        plot_acceptance(rows, labels, names, out / "acceptance.png")
    except Exception as e:  # a plot problem must not lose the measurements
        print(f"warning: could not draw the plots: {type(e).__name__}: {e}", file=sys.stderr)
    mm = mismatch_lines(rows)
    if mm:
        strict = cfg.dtype in ("float32", "float")
        print(f"WARNING: greedy outputs differ from {BASELINE!r}"
              + (" in float32 -- this is a bug to explain" if strict else
                 f" ({cfg.dtype}: near-ties can flip; rerun with --dtype float32 for the strict check)")
              + ": " + "; ".join(mm), file=sys.stderr)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'speedup.png'}, "
          f"{out / 'acceptance.png'}", file=sys.stderr)
    n_fail = len(failures(runs))
    if n_fail:
        print(f"error: {n_fail} of {len(runs)} worker run(s) failed (marked FAILED above)",
              file=sys.stderr)
        return 1
    return 0


def _env_info(runs: Sequence[dict]) -> dict[str, Any]:
    info: dict[str, Any] = {"python": platform.python_version(), "cpus": os.cpu_count()}
    for r in runs:
        if r.get("status") == "ok" and r.get("vllm_version"):
            info["vllm"] = r["vllm_version"]
            if r.get("torch_version"):
                info["torch"] = r["torch_version"]
            if r.get("device"):
                info["device"] = r["device"]
            break
    return info


# ==========================================================================
# Worker (runs in its own process; imports vLLM)
# ==========================================================================
def render_prompt(tokenizer: Any, messages: list[dict]) -> str:
    if getattr(tokenizer, "chat_template", None) is None:
        # A base model without a chat template: plain concatenation.
        return "\n\n".join(m["content"] for m in messages) + "\n\n"
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _chunks(items: list, size: Optional[int]) -> list[list]:
    if not size or size >= len(items):
        return [items]
    return [items[i:i + size] for i in range(0, len(items), size)]


def _drafter_stats(llm: Any) -> Optional[dict]:
    from vllm_spec_plugins.integration import drafter_snapshot

    for snap in llm.collective_rpc(drafter_snapshot):
        if snap is not None:
            return snap
    return None


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    method = MethodSpec(**spec["method"])
    result_path = Path(spec["result_path"])
    from vllm import LLM, SamplingParams

    kwargs = engine_kwargs(method, model=spec["model"], dtype=spec["dtype"], seed=spec["seed"],
                           k=spec["k"], kv_cache_bytes=spec["kv_cache_bytes"],
                           plugin_config=spec.get("plugin_config"))
    print(f"[bench worker] {method.label} repeat {spec['repeat']}: LLM({kwargs})",
          file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - t0
    tok = llm.get_tokenizer()
    is_plugin = method.kind == "plugin"

    llm.generate([render_prompt(tok, WARMUP_MESSAGES)],
                 SamplingParams(temperature=0, max_tokens=WARMUP_MAX_TOKENS), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"])
    results: dict[str, Any] = {}
    for w in spec["workloads"]:
        prompts = [render_prompt(tok, msgs) for msgs in w["prompts"]]
        m0 = spec_counters(llm.get_metrics())
        d0 = _drafter_stats(llm) if is_plugin else None
        wall = 0.0
        outputs = []
        for chunk in _chunks(prompts, spec.get("batch_size")):
            t = time.perf_counter()
            outputs.extend(llm.generate(chunk, params, use_tqdm=False))
            wall += time.perf_counter() - t
        m1 = spec_counters(llm.get_metrics())
        d1 = _drafter_stats(llm) if is_plugin else None
        token_ids = [list(map(int, o.outputs[0].token_ids)) for o in outputs]
        results[w["name"]] = {
            "wall_s": wall,
            "num_prompts": len(prompts),
            "prompt_tokens": sum(len(o.prompt_token_ids or []) for o in outputs),
            "output_tokens": sum(len(t) for t in token_ids),
            "token_ids": token_ids,
            "spec": counters_delta(m0, m1) if method.kind != "none" else None,
            "drafter": drafter_delta(d0, d1),
        }
        print(f"[bench worker] {w['name']}: {results[w['name']]['output_tokens']} tokens in "
              f"{wall:.2f} s", file=sys.stderr, flush=True)
    import torch
    import vllm

    _write_json_atomic(result_path, {
        "status": "ok", "label": method.label, "repeat": spec["repeat"],
        "startup_s": startup, "vllm_version": getattr(vllm, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "workloads": results})
    return 0


def _worker_cli(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description="bench worker (internal)")
    p.add_argument("--worker", required=True, metavar="SPEC_JSON")
    a = p.parse_args(argv)
    return worker_main(a.worker)


if __name__ == "__main__":
    sys.exit(_worker_cli())
