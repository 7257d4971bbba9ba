"""``vllm-spec-plugins bench``: speculative-decoding methods side by side.

For each repeat, every method runs in turn (rotated order per repeat, so slow
drift of a shared machine does not favour one method):

* offline: a worker subprocess (``bench/offline.py``) with its own ``LLM`` engine
  times ``llm.generate`` per workload at each ``--batch-sizes`` value;
* online: an OpenAI-compatible vLLM server is started for the method
  (``bench/online.py``) and loaded at each ``--concurrency`` level, measuring
  TTFT and inter-token latency; or, with ``--server-url``, a server the user
  already runs is measured as one method.

Each (workload, scenario) cell gets its own prompts, so cross-request caches
(suffix trees, vLLM's ``suffix``) never see a prompt twice within an engine.
The parent scores the outputs (HumanEval pass@1, math exact match), aggregates
(``stats.py``) and writes ``results.md`` (also printed), ``results.json``,
``speedup.png`` and ``acceptance.png`` under ``--out`` (``report.py``).

The parent process imports no vLLM.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vllm_spec_plugins import cpu_runtime
from vllm_spec_plugins.bench.methods import (
    BASELINE,
    MAX_MODEL_LEN,
    NGRAM_PROMPT_LOOKUP_MAX,
    NGRAM_PROMPT_LOOKUP_MIN,
    MethodSpec,
    engine_kwargs,
    parse_methods,
    validate_plugin_settings,
)
from vllm_spec_plugins.bench.report import PRELOAD_SUFFIX
from vllm_spec_plugins.bench.stats import failures, summarize
from vllm_spec_plugins.json_input import parse_json_object

DEFAULT_METHODS = "all"
DEFAULT_WORKLOADS = "code,chat,sharegpt,math,repetitive"
CPU_PRELOAD_CHOICES = ("auto", "on", "off", "both")
STDERR_TAIL_LINES = 20
POLL_SECONDS = 1.0

WORKER_ENV = {
    # drafter_snapshot travels to the workers as a pickled callable.
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    # Only this package's vLLM plugin: arctic_inference registers one too, which
    # must stay out (vLLM's built-in ``suffix`` imports arctic_inference directly).
    "VLLM_PLUGINS": "vllm_spec_plugins",
    "PYTHONUNBUFFERED": "1",
    "HF_HUB_OFFLINE": "1",
}


# ==========================================================================
# Arguments
# ==========================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options (cli.py calls this)."""
    p.add_argument("--model", default="smollm2-135m",
                   help="known model name (see `vllm-spec-plugins models list`) or a local "
                        "Hugging Face model directory (default: smollm2-135m)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of: all (default: every method that applies), none (no "
                        "speculation), ngram (vLLM prompt lookup), suffix (vLLM SuffixDecoding, "
                        "needs arctic_inference), draft_model (needs --draft-model), this "
                        "package's methods (suffix_tree, ..., with configs/<method>.json), "
                        "plugin:package.module:Class, or a config .json file")
    p.add_argument("--draft-model", default=None, metavar="MODEL",
                   help="drafter for vLLM's draft_model method (known name or local directory); "
                        "adds draft_model to 'all'")
    p.add_argument("--draft-model-k", type=int, default=None, metavar="K",
                   help="num_speculative_tokens of vLLM's draft_model method only (default: "
                        "--k); a draft model's best k is usually smaller than a model-free "
                        "method's upper bound")
    p.add_argument("--plugin-config", default=None, metavar="JSON",
                   help="settings laid over every plugin method's config, a JSON object, "
                        "e.g. '{\"max_tree_depth\": 32}'")
    p.add_argument("--workloads", default=DEFAULT_WORKLOADS,
                   help="comma list of code (HumanEval), chat (MT-Bench, 2 turns), sharegpt, "
                        "math (GSM8K-like), repetitive, or paths to .jsonl files "
                        f"(default: {DEFAULT_WORKLOADS})")
    p.add_argument("--num-prompts", type=int, default=8,
                   help="prompts per workload and scenario (default 8)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="max output tokens per turn (default 256)")
    p.add_argument("--k", type=int, default=8,
                   help="num_speculative_tokens, the same for every method (default 8)")
    p.add_argument("--mode", choices=("offline", "online", "both"), default="offline",
                   help="offline: LLM.generate batches; online: an OpenAI-compatible server "
                        "under concurrent streaming load (default offline)")
    p.add_argument("--batch-sizes", default="1,8", metavar="LIST",
                   help="offline: prompts per llm.generate call, a comma list (default 1,8)")
    p.add_argument("--concurrency", default="1,4", metavar="LIST",
                   help="online: requests in flight, a comma list (default 1,4)")
    p.add_argument("--server-url", default=None, metavar="URL",
                   help="online: measure this running OpenAI-compatible server (e.g. "
                        "http://localhost:8000) as one method instead of starting servers")
    p.add_argument("--server-label", default="server",
                   help="label of --server-url's method in the report (default: server)")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per method; the report gives median and min–max (default 3)")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default: bfloat16, but float32 with vLLM's CPU build on a "
                        "CPU without native bfloat16, where bfloat16 is emulated and slower; "
                        "float32 is also the strict greedy-equality check)")
    p.add_argument("--seed", type=int, default=0, help="workload sampling and engine seed (default 0)")
    p.add_argument("--out", default="bench_results", help="output directory (default bench_results/)")
    p.add_argument("--kv-cache-gb", type=float, default=2.0,
                   help="KV cache size per engine in GiB (default 2)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip torch.compile / graph capture (faster start, slower steps)")
    p.add_argument("--worker-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop a method's run after this long (default: no limit)")
    p.add_argument("--cpu-preload", default="auto", metavar="|".join(CPU_PRELOAD_CHOICES),
                   help="Intel OpenMP + tcmalloc in the engines' LD_PRELOAD (vLLM CPU build): "
                        "auto (default) as the VSP_CPU_PRELOAD switch says, on, off, or both: "
                        "every method with and without, side by side (labels like none, "
                        f"none{PRELOAD_SUFFIX})")
    p.add_argument("--traceback", action="store_true", help="show full tracebacks on errors")


@dataclass
class BenchConfig:
    model: str
    methods: list[MethodSpec]
    workloads: list[str]
    num_prompts: int
    max_tokens: int
    k: int
    mode: str
    batch_sizes: list[int]
    concurrency: list[int]
    repeats: int
    dtype: str
    seed: int
    out: str
    kv_cache_gb: float
    plugin_config: dict[str, Any] = field(default_factory=dict)
    draft_model: Optional[str] = None
    draft_model_k: Optional[int] = None
    server_url: Optional[str] = None
    enforce_eager: bool = False
    worker_timeout: Optional[float] = None
    notes: list[str] = field(default_factory=list)
    cpu_preload: str = "auto"

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gb * (1 << 30))

    def scenarios(self) -> list[tuple[str, str, int]]:
        """(scenario name, mode, batch size or concurrency), in run order."""
        out = []
        if self.mode in ("offline", "both") and not self.server_url:
            out += [(f"batch {b}", "offline", b) for b in self.batch_sizes]
        if self.mode in ("online", "both") or self.server_url:
            out += [(f"online c={c}", "online", c) for c in self.concurrency]
        return out


def _split_list(text: str, what: str) -> list[str]:
    items = [s.strip() for s in (text or "").split(",")]
    items = [s for s in items if s]
    if not items:
        raise ValueError(f"--{what}: empty list")
    dup = sorted({s for s in items if items.count(s) > 1})
    if dup:
        raise ValueError(f"--{what}: listed more than once: {', '.join(dup)}")
    return items


def parse_int_list(text: str, what: str) -> list[int]:
    out = []
    for item in _split_list(text, what):
        try:
            v = int(item)
        except ValueError:
            raise ValueError(f"--{what}: {item!r} is not a whole number") from None
        if v <= 0:
            raise ValueError(f"--{what}: values must be > 0, got {v}")
        out.append(v)
    return out


def parse_cpu_preload(text: Optional[str]) -> str:
    """``--cpu-preload`` -> auto / on / off / both. Raises ValueError naming the flag."""
    value = (text or "").strip().lower()
    if value not in CPU_PRELOAD_CHOICES:
        raise ValueError(f"--cpu-preload: expected one of {', '.join(CPU_PRELOAD_CHOICES)}, "
                         f"got {text!r}")
    return value


def apply_cpu_preload(methods: Sequence[MethodSpec], mode: str) -> list[MethodSpec]:
    """Methods as ``--cpu-preload`` runs them: on/off fix every method's preload;
    both runs each method twice, without and with (``label+preload``), next to
    each other; auto leaves the decision to VSP_CPU_PRELOAD at run time."""
    from dataclasses import replace

    if mode == "auto":
        return list(methods)
    if mode in ("on", "off"):
        return [replace(m, cpu_preload=(mode == "on")) for m in methods]
    out = []
    for m in methods:
        out.append(replace(m, cpu_preload=False))
        out.append(replace(m, label=m.label + PRELOAD_SUFFIX, cpu_preload=True))
    return out


def parse_plugin_config(text: Optional[str]) -> dict[str, Any]:
    """``--plugin-config`` JSON -> dict (must be an object without ``method``)."""
    if text is None or not text.strip():
        return {}
    obj = parse_json_object(text, "--plugin-config")
    if "method" in obj:
        raise ValueError("--plugin-config: 'method' is chosen with --methods, not in --plugin-config")
    return obj


def parse_workloads(text: str, known: Optional[Sequence[str]] = None) -> list[str]:
    """``--workloads`` -> list of names / .jsonl paths. Raises ValueError."""
    if known is None:
        from vllm_spec_plugins.bench.workloads import WORKLOADS

        known = list(WORKLOADS)
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


def default_dtype() -> tuple[str, Optional[str]]:
    """``--dtype``'s default and, when it is not bfloat16, the report note saying why."""
    from vllm_spec_plugins.cpu_runtime import cpu_vllm_installed, default_cpu_dtype

    if not cpu_vllm_installed():
        return "bfloat16", None
    dtype, why = default_cpu_dtype()
    return dtype, (None if dtype == "bfloat16" else f"note: dtype {dtype}: {why} (--dtype sets it)")


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if value is None or value <= 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"--{name} must be > 0, got {value}")


def config_from_args(args: argparse.Namespace, *, registry: Optional[dict[str, bool]] = None,
                     known_workloads: Optional[Sequence[str]] = None,
                     has_arctic: Optional[bool] = None) -> BenchConfig:
    """Validate the parsed arguments (no engine, no model access)."""
    _positive("num-prompts", args.num_prompts)
    _positive("max-tokens", args.max_tokens)
    _positive("k", args.k)
    _positive("draft-model-k", getattr(args, "draft_model_k", None), allow_none=True)
    _positive("repeats", args.repeats)
    _positive("kv-cache-gb", args.kv_cache_gb)
    _positive("worker-timeout", args.worker_timeout, allow_none=True)
    if args.max_tokens >= MAX_MODEL_LEN:
        raise ValueError(f"--max-tokens must be < max_model_len {MAX_MODEL_LEN}, got {args.max_tokens}")
    dtypes = ("auto", "bfloat16", "float16", "float32", "half", "float")
    dtype, dtype_note = args.dtype, None
    if dtype is None:
        dtype, dtype_note = default_dtype()
    if dtype not in dtypes:
        raise ValueError(f"--dtype: expected one of {', '.join(dtypes)}, got {args.dtype!r}")
    if args.server_url:
        if not re.match(r"^https?://[^/\s]+", args.server_url):
            raise ValueError(f"--server-url: expected http(s)://host:port, got {args.server_url!r}")
        if args.methods != DEFAULT_METHODS or args.draft_model:
            raise ValueError("--server-url measures the running server as one method: drop "
                             "--methods/--draft-model (the server's own speculative config applies)")
        methods = [MethodSpec(args.server_label, "server")]
        notes = [f"note: measuring the running server {args.server_url} as {args.server_label!r}; "
                 "no baseline, so no speedup or equality check"]
    else:
        methods, notes = parse_methods(args.methods, registry=registry, draft_model=args.draft_model,
                                       has_arctic=has_arctic)
    cpu_preload = parse_cpu_preload(getattr(args, "cpu_preload", "auto"))
    if cpu_preload != "auto" and args.server_url:
        raise ValueError("--cpu-preload: a --server-url server runs with its own environment; "
                         "drop --cpu-preload (use `vllm-spec-plugins cpu-env` where it starts)")
    methods = apply_cpu_preload(methods, cpu_preload)
    if dtype_note:
        notes = [*notes, dtype_note]
    return BenchConfig(
        model=args.model, methods=methods,
        workloads=parse_workloads(args.workloads, known_workloads),
        num_prompts=args.num_prompts, max_tokens=args.max_tokens, k=args.k, mode=args.mode,
        batch_sizes=parse_int_list(args.batch_sizes, "batch-sizes"),
        concurrency=parse_int_list(args.concurrency, "concurrency"),
        repeats=args.repeats, dtype=dtype, seed=args.seed, out=args.out,
        kv_cache_gb=args.kv_cache_gb, plugin_config=parse_plugin_config(args.plugin_config),
        draft_model=args.draft_model, draft_model_k=getattr(args, "draft_model_k", None),
        server_url=args.server_url,
        enforce_eager=bool(args.enforce_eager), worker_timeout=args.worker_timeout, notes=notes,
        cpu_preload=cpu_preload)


def rotated_order(items: Sequence[Any], repeat: int) -> list[Any]:
    """Repeat ``r`` runs the methods starting at index ``r mod n``."""
    items = list(items)
    if not items:
        return []
    s = repeat % len(items)
    return items[s:] + items[:s]


def run_schedule(methods: Sequence[Any], repeats: int) -> list[tuple[int, Any]]:
    return [(r, m) for r in range(repeats) for m in rotated_order(methods, r)]


def resolve_model_path(name_or_path: str, flag: str = "--model") -> str:
    """Known model name -> provisioned dir; else an existing local HF directory."""
    from vllm_spec_plugins.models import MODELS, resolve_model

    if name_or_path in MODELS:
        return resolve_model(name_or_path)
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ValueError(f"{flag}: {str(p)!r} is a directory without config.json, "
                             "not a Hugging Face model directory")
        return str(p.resolve())
    raise ValueError(f"{flag}: {name_or_path!r} is neither a known model "
                     f"({', '.join(sorted(MODELS))}) nor a local model directory")


# ==========================================================================
# Cells: each (workload, scenario) gets its own slice of prompts
# ==========================================================================
def build_cells(workloads: Sequence[Any], scenarios: Sequence[tuple[str, str, int]],
                per_cell: int) -> list[dict[str, Any]]:
    """Split each workload (loaded with ``per_cell * len(scenarios)`` prompts) into
    one disjoint slice per scenario."""
    cells = []
    for w in workloads:
        for j, (scen, mode, size) in enumerate(scenarios):
            lo, hi = j * per_cell, (j + 1) * per_cell
            cells.append({
                "workload": w.name, "scenario": scen, "mode": mode,
                "batch_size": size if mode == "offline" else None,
                "concurrency": size if mode == "online" else None,
                "prompts": w.prompts[lo:hi],
                "followups": (w.followups[lo:hi] if getattr(w, "followups", None) else []),
                "references": (w.references[lo:hi] if getattr(w, "references", None) else []),
                "scorer": getattr(w, "scorer", None),
            })
    return cells


def load_workloads(cfg: BenchConfig, n_scenarios: int) -> list[Any]:
    from vllm_spec_plugins.bench.workloads import load_workload

    need = cfg.num_prompts * n_scenarios
    loaded = []
    for spec in cfg.workloads:
        try:
            w = load_workload(spec, need, cfg.seed)
        except ValueError as e:
            raise ValueError(f"workload {spec!r}: {e}; lower --num-prompts ({cfg.num_prompts} × "
                             f"{n_scenarios} scenario(s), each with its own prompts)") from None
        if len(w) < need:
            raise ValueError(f"workload {spec!r} has {len(w)} prompts, {need} needed "
                             f"(--num-prompts {cfg.num_prompts} × {n_scenarios} scenario(s))")
        loaded.append(w)
    names = [w.name for w in loaded]
    if len(set(names)) != len(names):
        raise ValueError(f"--workloads: two workloads share a name: {names}")
    return loaded


def score_measurement(m: dict, cell: dict) -> None:
    """Attach the task score of a measurement's outputs (last turn of each conversation)."""
    if not cell.get("scorer") or not m.get("texts"):
        return
    from vllm_spec_plugins.bench.tasks import score

    outputs = [t[-1] if t else "" for t in m["texts"]]
    res = score(cell["scorer"], outputs, cell["references"])
    m["task"] = {k: res[k] for k in ("scorer", "metric", "score", "passed", "n")}
    m["task"]["per_prompt"] = list(res.get("per_prompt", []))


# ==========================================================================
# Offline runs: one worker subprocess per (repeat, method)
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


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the worker and the engine processes it started (its own session)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (ProcessLookupError, subprocess.TimeoutExpired, PermissionError):
        pass
    # The worker may exit while its engine processes linger in the group (an
    # engine core waiting on a worker that is still compiling ignores SIGTERM and
    # would go on computing as an orphan, skewing every later measurement).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _count_cells_done(err_log: Path) -> int:
    try:
        return err_log.read_text(errors="replace").count("[bench worker] cell done")
    except OSError:
        return 0


def run_offline_worker(spec: dict, run_dir: Path, timeout: Optional[float],
                       on_progress: Optional[Callable[[int], None]] = None,
                       env: Optional[dict[str, str]] = None) -> dict:
    """Run one (repeat, method) offline worker subprocess; its result or a failure.
    ``env``: the worker's whole environment (default: ours plus ``WORKER_ENV``)."""
    stem = f"r{spec['repeat']}-{_safe_name(spec['method']['label'])}-offline"
    spec_path = run_dir / f"{stem}.spec.json"
    result_path = run_dir / f"{stem}.result.json"
    out_log, err_log = run_dir / f"{stem}.stdout.log", run_dir / f"{stem}.stderr.log"
    result_path.unlink(missing_ok=True)
    spec = dict(spec, result_path=str(result_path))
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, **WORKER_ENV) if env is None else env
    cmd = [sys.executable, "-m", "vllm_spec_plugins.bench.offline", str(spec_path)]
    base = {"label": spec["method"]["label"], "repeat": spec["repeat"],
            "stdout_log": str(out_log), "stderr_log": str(err_log)}
    t0 = time.perf_counter()
    rc: Optional[int] = None
    done = 0
    with open(out_log, "wb") as fo, open(err_log, "wb") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, env=env, start_new_session=True)
        try:
            while True:
                try:
                    rc = proc.wait(timeout=POLL_SECONDS)
                    break
                except subprocess.TimeoutExpired:
                    if timeout is not None and time.perf_counter() - t0 > timeout:
                        _kill_group(proc)
                        rc = None
                        break
                    if on_progress is not None:
                        now = _count_cells_done(err_log)
                        if now > done:
                            on_progress(now - done)
                            done = now
        except BaseException:
            _kill_group(proc)
            raise
    if on_progress is not None:
        now = _count_cells_done(err_log)
        if now > done:
            on_progress(now - done)
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


# ==========================================================================
# Online runs: a server per (repeat, method), or the user's running server
# ==========================================================================
def run_online(cfg: BenchConfig, method: MethodSpec, repeat: int, cells: Sequence[dict],
               kwargs: Optional[dict], run_dir: Path,
               on_progress: Optional[Callable[[int], None]] = None,
               env: Optional[dict[str, str]] = None) -> dict:
    """``env``: the server's environment (default: ours plus ``WORKER_ENV``)."""
    from vllm_spec_plugins.bench import online

    return online.run_cells(
        label=method.label, repeat=repeat, cells=cells, engine_kwargs=kwargs,
        server_url=cfg.server_url, max_tokens=cfg.max_tokens,
        env=dict(os.environ, **WORKER_ENV) if env is None else env, log_dir=run_dir,
        timeout=cfg.worker_timeout, on_cell_done=on_progress)


# ==========================================================================
# CPU preload: Intel OpenMP + tcmalloc in the engines' LD_PRELOAD
# ==========================================================================
@dataclass
class PreloadPlan:
    """What ``--cpu-preload`` means for this run, resolved once before any engine."""

    libraries: list[str]                  # the paths a preloaded run gets
    by_label: dict[str, Optional[bool]]   # method label -> on / off / None (environment as is)
    description: str                      # the report's "cpu preload" line


def plan_cpu_preload(cfg: BenchConfig, libs: Optional[cpu_runtime.CpuRuntimeLibs] = None,
                     environ: Optional[dict[str, str]] = None,
                     cpu_build: Optional[bool] = None) -> PreloadPlan:
    """Resolve ``--cpu-preload`` against the libraries found here. Raises
    ValueError when preloaded runs are asked for and neither library exists."""
    environ = dict(os.environ) if environ is None else environ
    libs = cpu_runtime.find_libraries() if libs is None else libs
    explicit = {m.label: m.cpu_preload for m in cfg.methods}
    if cfg.cpu_preload == "auto":
        switch = cpu_runtime.switch_value(environ)
        cpu_build = cpu_runtime.cpu_vllm_installed() if cpu_build is None else cpu_build
        paths = cpu_runtime.libraries_to_preload(switch, libs, cpu_build=cpu_build)
        by_label = {label: (True if paths else None) for label in explicit}
        what = (f"LD_PRELOAD += {':'.join(paths)}" if paths else "LD_PRELOAD as in the environment")
        return PreloadPlan(paths, by_label,
                           f"auto ({cpu_runtime.SWITCH_ENV}={switch}): {what}")
    paths = libs.paths()
    if not paths and any(explicit.values()):
        raise ValueError(f"--cpu-preload {cfg.cpu_preload}: neither libiomp5.so nor libtcmalloc "
                         "found; install them with bash scripts/setup.sh (pip install "
                         "intel-openmp; apt-get install libtcmalloc-minimal4) or use "
                         "--cpu-preload off")
    missing = f" ({', '.join(libs.missing())} not found)" if libs.missing() else ""
    if cfg.cpu_preload == "both":
        text = (f"both: `{PRELOAD_SUFFIX}` runs have LD_PRELOAD += {':'.join(paths)}{missing}; "
                "the others have no libiomp / libtcmalloc in LD_PRELOAD (vLLM's default: "
                "torch's libgomp)")
    elif cfg.cpu_preload == "on":
        text = f"on: LD_PRELOAD += {':'.join(paths)}{missing}"
    else:
        text = "off: no libiomp / libtcmalloc in LD_PRELOAD (vLLM's default: torch's libgomp)"
    return PreloadPlan(paths, explicit, text)


def worker_environ(preload: Optional[bool], libraries: Sequence[str],
                   environ: Optional[dict[str, str]] = None) -> dict[str, str]:
    """The environment of a method's worker or server: ``WORKER_ENV`` over ours,
    then LD_PRELOAD with the libraries (True), without any libiomp / libtcmalloc
    (False), or as it is (None)."""
    env = dict(os.environ if environ is None else environ, **WORKER_ENV)
    if preload is None:
        return env
    env = cpu_runtime.without_preload(env)
    if preload:
        env["LD_PRELOAD"] = cpu_runtime.compose_preload(env.get("LD_PRELOAD"), libraries)
    return env


# ==========================================================================
# The whole benchmark
# ==========================================================================
def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("the benchmark's plots need matplotlib: `pip install matplotlib` "
                           "(or the project's bench extra: `pip install -e .[bench]`)")


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _merge_runs(a: Optional[dict], b: Optional[dict]) -> dict:
    """One run out of the offline and online halves of a (repeat, method)."""
    if a is None:
        return b  # type: ignore[return-value]
    if b is None:
        return a
    if a.get("status") != "ok" or b.get("status") != "ok":
        bad = a if a.get("status") != "ok" else b
        return dict(bad, measurements=a.get("measurements", []) + b.get("measurements", []))
    return dict(a, measurements=a["measurements"] + b["measurements"],
                online_startup_s=b.get("startup_s"))


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


def run_from_args(args: argparse.Namespace) -> int:
    """Turns SIGTERM into KeyboardInterrupt while it runs, so a killed benchmark
    still stops the engines and servers it started (they run in their own sessions)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return _run(args)

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    for line in cfg.notes:
        print(line, file=sys.stderr)
    validate_plugin_settings(cfg.methods, cfg.plugin_config)
    _require_matplotlib()
    scenarios = cfg.scenarios()
    loaded = load_workloads(cfg, len(scenarios))
    cells = build_cells(loaded, scenarios, cfg.num_prompts)
    for c in cells:
        if c["scorer"]:
            from vllm_spec_plugins.bench.tasks import SCORERS

            if c["scorer"] not in SCORERS:
                raise ValueError(f"workload {c['workload']!r}: unknown scorer {c['scorer']!r}")
    offline_cells = [c for c in cells if c["mode"] == "offline"]
    online_cells = [c for c in cells if c["mode"] == "online"]
    model_path = resolve_model_path(cfg.model) if not cfg.server_url else cfg.model
    draft_path = resolve_model_path(cfg.draft_model, "--draft-model") if cfg.draft_model else None
    preload = plan_cpu_preload(cfg)

    out = Path(cfg.out)
    run_dir = out / "runs"
    run_dir.mkdir(parents=True, exist_ok=True)
    labels = [m.label for m in cfg.methods]
    lossless = {m.label: m.lossless for m in cfg.methods}
    if BASELINE not in labels and not cfg.server_url:
        print(f"note: method {BASELINE!r} is not in --methods: no speedup and no greedy "
              "equality check", file=sys.stderr)

    from tqdm import tqdm

    schedule = run_schedule(cfg.methods, cfg.repeats)
    runs: list[dict] = []
    bar = tqdm(total=len(schedule) * len(cells), desc="bench", unit="cell", file=sys.stderr,
               dynamic_ncols=True)
    t_start = time.time()
    cell_by_key = {(c["workload"], c["scenario"]): c for c in cells}
    try:
        for i_run, (repeat, m) in enumerate(schedule):
            bar.set_postfix_str(f"repeat {repeat + 1}/{cfg.repeats} {m.label}")
            kwargs = None
            k_m = cfg.draft_model_k if (m.kind == "draft_model" and cfg.draft_model_k) else cfg.k
            if m.kind != "server":
                kwargs = engine_kwargs(m, model=model_path, dtype=cfg.dtype, seed=cfg.seed,
                                       k=k_m, kv_cache_bytes=cfg.kv_cache_bytes,
                                       plugin_config=cfg.plugin_config,
                                       draft_model_path=draft_path,
                                       enforce_eager=cfg.enforce_eager)
            off = on = None
            env = worker_environ(preload.by_label.get(m.label), preload.libraries)
            if offline_cells:
                spec = {"method": asdict(m), "repeat": repeat, "model": model_path,
                        "dtype": cfg.dtype, "seed": cfg.seed, "k": k_m,
                        "max_tokens": cfg.max_tokens, "kv_cache_bytes": cfg.kv_cache_bytes,
                        "plugin_config": cfg.plugin_config, "draft_model_path": draft_path,
                        "enforce_eager": cfg.enforce_eager,
                        "cells": [{k: c[k] for k in ("workload", "scenario", "batch_size",
                                                     "prompts", "followups")}
                                  for c in offline_cells]}
                off = run_offline_worker(spec, run_dir, cfg.worker_timeout, bar.update, env=env)
            if online_cells:
                on = run_online(cfg, m, repeat, online_cells, kwargs, run_dir, bar.update,
                                env=None if cfg.server_url else env)
            res = _merge_runs(off, on)
            for meas in res.get("measurements", []):
                cell = cell_by_key.get((meas["workload"], meas["scenario"]))
                if cell is not None:
                    try:
                        score_measurement(meas, cell)
                    except Exception as e:  # scoring must not lose the measurements
                        meas["task_error"] = f"{type(e).__name__}: {e}"
            runs.append(res)
            if res["status"] != "ok":
                msg = [f"error: method {m.label!r} failed (repeat {repeat}): {res['error']}"]
                if res.get("stderr_tail"):
                    msg[0] += f"; last lines of its log ({res.get('stderr_log')}):"
                    msg += ["    " + ln for ln in res["stderr_tail"]]
                bar.write("\n".join(msg), file=sys.stderr)
            elif res.get("note"):
                bar.write(f"note: method {m.label!r} (repeat {repeat}): {res['note']}", file=sys.stderr)
            # keep the bar honest when a run failed before finishing its cells
            expected = (i_run + 1) * len(cells)
            if bar.n < expected:
                bar.update(expected - bar.n)
    finally:
        bar.close()
    return finish(cfg, runs, labels, lossless, loaded, scenarios, cells, model_path, out, t_start,
                  preload_description=None if cfg.server_url else preload.description)


def finish(cfg: BenchConfig, runs: list[dict], labels: list[str], lossless: dict[str, bool],
           loaded: Sequence[Any], scenarios: Sequence[tuple[str, str, int]],
           cells: Sequence[dict], model_path: str, out: Path, t_start: float,
           preload_description: Optional[str] = None) -> int:
    from vllm_spec_plugins.bench.report import (
        mismatch_lines,
        plot_acceptance,
        plot_latency,
        plot_speedup,
        render_report,
        settings_lines,
    )

    names = [w.name for w in loaded]
    scen_names = [s[0] for s in scenarios]
    cell_keys = [(c["workload"], c["scenario"]) for c in cells]
    rows = summarize(runs, labels, cell_keys, lossless)
    env_info = _env_info(runs)
    settings = settings_lines(cfg, model_path)
    settings["scenarios"] = ", ".join(scen_names)
    settings["ngram"] = f"prompt_lookup_min {NGRAM_PROMPT_LOOKUP_MIN}, max {NGRAM_PROMPT_LOOKUP_MAX}"
    if preload_description:
        settings["cpu preload"] = preload_description
    report = render_report(settings, rows, runs, cfg.notes, env_info)
    print(report)
    (out / "results.md").write_text(report + "\n")
    data = {"config": {**asdict(cfg), "methods": [asdict(m) for m in cfg.methods],
                       "model_path": model_path, "max_model_len": MAX_MODEL_LEN,
                       "scenarios": scen_names,
                       "ngram_prompt_lookup": [NGRAM_PROMPT_LOOKUP_MIN, NGRAM_PROMPT_LOOKUP_MAX]},
            "started": t_start, "finished": time.time(), "environment": env_info,
            "summary": rows, "runs": runs,
            "workloads": [{"name": w.name, "meta": w.meta, "scorer": getattr(w, "scorer", None)}
                          for w in loaded]}
    (out / "results.json").write_text(json.dumps(data, indent=1, default=_json_default))
    written = [out / "results.md", out / "results.json"]
    try:
        plot_speedup(rows, labels, names, scen_names, out / "speedup.png")
        plot_acceptance(rows, labels, names, out / "acceptance.png")
        written += [out / "speedup.png", out / "acceptance.png"]
        if plot_latency(rows, labels, names, scen_names, out / "latency.png"):
            written.append(out / "latency.png")
    except Exception as e:  # a plot problem must not lose the measurements
        print(f"warning: could not draw the plots: {type(e).__name__}: {e}", file=sys.stderr)
    status = 0
    mm = mismatch_lines(rows)
    if mm:
        strict = cfg.dtype in ("float32", "float")
        print(f"WARNING: greedy outputs of lossless methods differ from {BASELINE!r}"
              + (" in float32 -- this is a bug to explain" if strict else
                 f" ({cfg.dtype}: near-ties can flip; rerun with --dtype float32 for the strict check)")
              + ":\n  " + "\n  ".join(mm), file=sys.stderr)
        if strict:
            status = 1
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    n_fail = len(failures(runs))
    if n_fail:
        print(f"error: {n_fail} of {len(runs)} run(s) failed (marked FAILED above)", file=sys.stderr)
        status = 1
    return status
