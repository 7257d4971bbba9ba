"""Memory soak: does a served engine's memory level off under long traffic?

``python -m vllm_spec_plugins.bench.soak [--requests 2000] [--out DIR]``
(also ``vllm-spec-plugins soak``).

For each method of ``--methods`` (default ``none,suffix_tree``) a vLLM
OpenAI-compatible server is started (``online.ServerProcess``) and sent the
same seeded schedule of streamed chat requests, ``--concurrency`` at a time:
short chat prompts and long documents (``--long-prompt-tokens``), a
``max_tokens`` drawn from ``--max-tokens``, greedy and sampled, and a
``--abort-fraction`` of them aborted by closing the stream after a random
number of received chunks (0 = right after the response headers, i.e. during
prefill). Every ``--sample-every`` requests the load is drained and the
server's memory is recorded:

* RSS (psutil) of every process in the server's process tree, summed, and of
  the *engine* processes alone. Processes are told apart by the title vLLM
  gives them with ``setproctitle`` (it shows in ``cmdline`` and ``name``):
  ``VLLM::EngineCore`` is the engine core (scheduler), ``VLLM::Worker...``
  the model workers; both count as engine. vLLM 0.32's CPU build runs one
  worker in its own process (multiproc executor), and the model, the KV
  cache and the plugin's drafter live there. The API server is the root
  process; anything else in the tree (multiprocessing's resource tracker)
  counts as ``other``. Each role's RSS is recorded too.
* With the probe on (default; ``--no-probe`` turns it off), the plugin's
  request table size, the bytes of its cross-request state (suffix-tree
  global cache, Token Recycling matrix) and the number of Python objects in
  the worker, read through a worker extension
  (``bench/soak_probe.py``) and vLLM's dev-mode ``/collective_rpc``.
  At the end, ``malloc_trim(0)`` is called in the worker and the engine RSS
  measured again: what that gives back was freed memory the C allocator
  kept, not live data.

Verdict per method (computed from the samples, never asserted): least-squares
slopes of the engine RSS over the first and the second half of the run, in
MB per 1000 requests. The memory *levels off* when the second-half slope is
below ``--level-slope`` (default 20), or below ``--level-fraction`` (default
0.25) of the first-half slope. For every method except ``none`` its growth is
also compared with ``none``'s (same server without speculation, same
requests): that difference is what the plugin adds.

``--out DIR`` gets ``results.json`` (config, every sample, every request's
outcome, verdicts), ``results.md`` (tables, also printed) and ``rss.png``
(RSS vs requests served per method). The results are rewritten after each
method, so a long soak that is stopped keeps what it measured.

The parent process imports no vLLM: the servers are subprocesses.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import math
import os
import platform
import random
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from vllm_spec_plugins.bench.methods import (
    BASELINE,
    MAX_MODEL_LEN,
    MethodSpec,
    engine_kwargs,
    parse_methods,
    validate_plugin_settings,
)

DEFAULT_METHODS = "none,suffix_tree"
PROBE_CLASS = "vllm_spec_plugins.bench.soak_probe.SoakProbe"
MB = 1e6
#: The "after warm-up" point: the first sample at or after this share of the run.
WARMUP_SHARE = 0.1
#: Pause after a drained batch before sampling: aborted requests' cleanup
#: reaches the engine a moment after the client closed the stream.
SETTLE_S = 0.5
#: Room left in max_model_len for the chat template and the estimate's error
#: (long prompts are sized by an estimate, not the tokenizer).
PROMPT_MARGIN_TOKENS = 600
#: A method's run stops when more than this share of its requests failed.
MAX_ERROR_SHARE = 0.1
SAMPLED_TEMPERATURE = 0.8


# ==========================================================================
# Arguments
# ==========================================================================
def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``soak`` subcommand's options (cli.py calls this too)."""
    p.add_argument("--model", default="smollm2-135m",
                   help="known model name or a local Hugging Face model directory "
                        "(default: smollm2-135m)")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help="comma list of methods the bench knows (none, ngram, suffix_tree, "
                        "token_recycling, ..., a config .json); include none: it is the "
                        f"baseline the plugin's growth is compared with (default: {DEFAULT_METHODS})")
    p.add_argument("--requests", type=int, default=2000,
                   help="streamed requests per method (default 2000)")
    p.add_argument("--concurrency", type=int, default=8,
                   help="requests in flight (default 8)")
    p.add_argument("--sample-every", type=int, default=100, metavar="N",
                   help="drain the load and record memory every N requests (default 100)")
    p.add_argument("--abort-fraction", type=float, default=0.25,
                   help="share of requests aborted by closing the stream after a random "
                        "number of chunks (default 0.25)")
    p.add_argument("--long-fraction", type=float, default=0.3,
                   help="share of requests with a long document prompt; the rest are "
                        "short chat prompts (default 0.3)")
    p.add_argument("--long-prompt-tokens", default="300:3000", metavar="LO:HI",
                   help="approximate length of the long prompts in tokens, drawn uniformly "
                        "(default 300:3000)")
    p.add_argument("--max-tokens", default="16:256", metavar="LO:HI",
                   help="max_tokens of each request, drawn uniformly (default 16:256)")
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens (default 8)")
    p.add_argument("--plugin-config", default=None, metavar="JSON",
                   help="settings laid over every plugin method's config, e.g. "
                        "'{\"max_cached_tokens\": 100000}'")
    p.add_argument("--dtype", default="float32",
                   help="model dtype (default float32)")
    p.add_argument("--kv-cache-gb", type=float, default=1.0,
                   help="KV cache per engine in GiB (default 1)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="skip torch.compile / graph capture (faster start, slower steps)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the request schedule and the engine (default 0)")
    p.add_argument("--level-slope", type=float, default=20.0, metavar="MB",
                   help="memory levels off when the second-half slope is below this many "
                        "MB per 1000 requests (default 20)")
    p.add_argument("--level-fraction", type=float, default=0.25,
                   help="... or below this fraction of the first-half slope (default 0.25)")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment variable for the servers, repeatable; e.g. "
                        "MALLOC_ARENA_MAX=2 to test whether growth is the C allocator's")
    p.add_argument("--no-probe", action="store_true",
                   help="do not read the plugin's request table and state through vLLM's "
                        "dev-mode /collective_rpc (the server then runs exactly as a user's)")
    p.add_argument("--startup-timeout", type=float, default=900, metavar="SECONDS",
                   help="wait this long for each server to become ready (default 900)")
    p.add_argument("--request-timeout", type=float, default=600, metavar="SECONDS",
                   help="give up on one request after this long (default 600)")
    p.add_argument("--out", default="soak_results", help="output directory (default soak_results/)")


@dataclass
class SoakConfig:
    model: str
    methods: list[MethodSpec]
    requests: int
    concurrency: int
    sample_every: int
    abort_fraction: float
    long_fraction: float
    long_prompt_tokens: tuple[int, int]
    max_tokens: tuple[int, int]
    k: int
    dtype: str
    kv_cache_gb: float
    seed: int
    level_slope: float
    level_fraction: float
    probe: bool
    out: str
    plugin_config: dict[str, Any] = field(default_factory=dict)
    server_env: dict[str, str] = field(default_factory=dict)
    enforce_eager: bool = False
    startup_timeout: float = 900
    request_timeout: float = 600
    notes: list[str] = field(default_factory=list)

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gb * (1 << 30))


def parse_range(text: str, flag: str) -> tuple[int, int]:
    """``"LO:HI"`` (or one number ``"N"`` = ``N:N``) -> (lo, hi), whole numbers >= 1."""
    parts = str(text).split(":")
    if len(parts) not in (1, 2):
        raise ValueError(f"{flag}: expected LO:HI (e.g. 16:256), got {text!r}")
    try:
        lo, hi = int(parts[0]), int(parts[-1])
    except ValueError:
        raise ValueError(f"{flag}: expected whole numbers LO:HI (e.g. 16:256), got {text!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(f"{flag}: need 1 <= LO <= HI, got {text!r}")
    return lo, hi


def parse_server_env(items: Sequence[str]) -> dict[str, str]:
    """``--server-env KEY=VALUE`` items -> dict."""
    env: dict[str, str] = {}
    for item in items or ():
        key, sep, value = str(item).partition("=")
        if not sep or not key.strip() or any(c.isspace() for c in key):
            raise ValueError(f"--server-env: expected KEY=VALUE (e.g. MALLOC_ARENA_MAX=2), got {item!r}")
        env[key] = value
    return env


def _check_share(flag: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{flag} must be between 0 and 1, got {value}")


def _check_positive(flag: str, value: Any) -> None:
    if value is None or not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{flag} must be > 0, got {value}")


def config_from_args(args: argparse.Namespace, *, registry: Optional[dict[str, bool]] = None,
                     has_arctic: Optional[bool] = None) -> SoakConfig:
    """Validate the parsed arguments (no engine, no model access). Every error
    names the flag and what to pass instead."""
    from vllm_spec_plugins.bench.runner import parse_plugin_config
    from vllm_spec_plugins.engine_config import check_num_speculative_tokens

    for flag, value in (("--requests", args.requests), ("--concurrency", args.concurrency),
                        ("--sample-every", args.sample_every), ("--k", args.k),
                        ("--kv-cache-gb", args.kv_cache_gb), ("--level-slope", args.level_slope),
                        ("--startup-timeout", args.startup_timeout),
                        ("--request-timeout", args.request_timeout)):
        _check_positive(flag, value)
    if args.sample_every * 2 > args.requests:
        raise ValueError(f"--sample-every {args.sample_every} leaves fewer than two samples per "
                         f"half of --requests {args.requests} (the verdict compares the halves): "
                         f"use --sample-every {max(1, args.requests // 2)} or less, or more "
                         "--requests")
    try:
        check_num_speculative_tokens(args.k)
    except ValueError as e:
        raise ValueError(f"--k: {e}") from None
    _check_share("--abort-fraction", args.abort_fraction)
    _check_share("--long-fraction", args.long_fraction)
    if not 0.0 < args.level_fraction < 1.0:
        raise ValueError(f"--level-fraction must be between 0 and 1 (exclusive), "
                         f"got {args.level_fraction}")
    long_range = parse_range(args.long_prompt_tokens, "--long-prompt-tokens")
    out_range = parse_range(args.max_tokens, "--max-tokens")
    room = MAX_MODEL_LEN - PROMPT_MARGIN_TOKENS
    if long_range[1] + out_range[1] > room:
        raise ValueError(f"--long-prompt-tokens HI {long_range[1]} + --max-tokens HI "
                         f"{out_range[1]} must be at most {room} (max_model_len {MAX_MODEL_LEN} "
                         f"less {PROMPT_MARGIN_TOKENS} for the chat template and the length "
                         "estimate): lower one of them")
    dtypes = ("auto", "bfloat16", "float16", "float32", "half", "float")
    if args.dtype not in dtypes:
        raise ValueError(f"--dtype: expected one of {', '.join(dtypes)}, got {args.dtype!r}")
    methods, notes = parse_methods(args.methods, registry=registry, has_arctic=has_arctic)
    if any(m.label == "all" for m in methods):  # pragma: no cover - parse_methods expands it
        raise ValueError("--methods: 'all' is expanded by the bench")
    if BASELINE not in [m.label for m in methods]:
        notes.append(f"note: {BASELINE!r} is not in --methods: the plugin's growth cannot be "
                     "separated from vLLM's own (add none)")
    return SoakConfig(
        model=args.model, methods=methods, requests=int(args.requests),
        concurrency=int(args.concurrency), sample_every=int(args.sample_every),
        abort_fraction=float(args.abort_fraction), long_fraction=float(args.long_fraction),
        long_prompt_tokens=long_range, max_tokens=out_range, k=int(args.k), dtype=args.dtype,
        kv_cache_gb=float(args.kv_cache_gb), seed=int(args.seed),
        level_slope=float(args.level_slope), level_fraction=float(args.level_fraction),
        probe=not args.no_probe, out=args.out,
        plugin_config=parse_plugin_config(args.plugin_config),
        server_env=parse_server_env(args.server_env),
        enforce_eager=bool(args.enforce_eager), startup_timeout=float(args.startup_timeout),
        request_timeout=float(args.request_timeout), notes=notes)


# ==========================================================================
# The request schedule (the same for every method)
# ==========================================================================
@dataclass(frozen=True)
class PlannedRequest:
    index: int
    kind: str                          # "short" chat prompt | "long" document
    prompt_tokens: int                 # target length of a long prompt (estimate); 0 for short
    text_seed: int                     # seeds the prompt's text
    max_tokens: int
    temperature: float
    #: close the stream after this many content chunks; None = read to the end
    abort_after_chunks: Optional[int]


def build_schedule(n: int, *, abort_fraction: float, long_fraction: float,
                   long_prompt_tokens: tuple[int, int], max_tokens: tuple[int, int],
                   seed: int) -> list[PlannedRequest]:
    """``n`` requests, deterministic for a seed. Exactly ``round(n * long_fraction)``
    have long prompts and ``round(n * abort_fraction)`` are aborted (chosen at
    random, independently); an abort comes after 0..max_tokens/4 content chunks
    (0: as soon as the response headers arrive, during prefill). Half the
    requests, at random, sample at temperature 0.8; the rest are greedy."""
    rng = random.Random(seed)
    long_idx = set(rng.sample(range(n), round(n * long_fraction)))
    abort_idx = set(rng.sample(range(n), round(n * abort_fraction)))
    plan = []
    for i in range(n):
        out_tokens = rng.randint(*max_tokens)
        long = i in long_idx
        plan.append(PlannedRequest(
            index=i, kind="long" if long else "short",
            prompt_tokens=rng.randint(*long_prompt_tokens) if long else 0,
            text_seed=rng.randrange(2 ** 31), max_tokens=out_tokens,
            temperature=SAMPLED_TEMPERATURE if rng.random() < 0.5 else 0.0,
            abort_after_chunks=rng.randint(0, out_tokens // 4) if i in abort_idx else None))
    return plan


def schedule_summary(plan: Sequence[PlannedRequest]) -> dict[str, Any]:
    n = len(plan)
    longs = [p.prompt_tokens for p in plan if p.kind == "long"]
    outs = [p.max_tokens for p in plan]
    return {"requests": n, "long_prompts": len(longs), "aborted_planned":
            sum(p.abort_after_chunks is not None for p in plan),
            "sampled": sum(p.temperature > 0 for p in plan),
            "long_prompt_tokens_min_max": [min(longs), max(longs)] if longs else None,
            "max_tokens_min_max": [min(outs), max(outs)] if outs else None}


_NOUNS = ["falcon", "river", "harbor", "lantern", "garden", "engine", "compiler", "teapot",
          "library", "mountain", "violin", "satellite", "bakery", "glacier", "parser", "meadow",
          "ledger", "kernel", "bridge", "orchard", "archive", "beacon", "canyon", "router"]
_ADJS = ["quiet", "rusty", "bright", "ancient", "tiny", "curious", "frozen", "noisy", "gentle",
         "hidden", "silver", "patient", "crooked", "hollow", "eager", "distant"]
_VERBS = ["watches", "repairs", "ignores", "follows", "measures", "paints", "remembers",
          "collects", "guards", "crosses", "rebuilds", "describes"]
_SERVICES = ["auth", "billing", "search", "ingest", "scheduler", "cache", "gateway", "mailer"]
_LEVELS = ["INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"]
_SHORT_TEMPLATES = [
    "Write a haiku about a {adj} {noun}.",
    "In two sentences, explain why a {noun} {verb} the {noun2}.",
    "Give me three tips for looking after a {adj} {noun}.",
    "What is the difference between a {noun} and a {noun2}? Answer briefly.",
    "Tell a very short story in which a {adj} {noun} {verb} a {noun2}.",
    "List five words that rhyme with {noun}.",
    "Suggest a name for a {adj} {noun} and say why in one sentence.",
    "Describe a {noun} to a child in three sentences, then ask them a question about it.",
]
_LONG_TASKS = [
    "Rewrite the document above exactly, but replace every {word} with {word2}.",
    "Summarise the document above in a few sentences.",
    "Continue the document above with more lines in exactly the same format.",
    "Copy the last ten lines of the document above, then explain what they say.",
]
#: Tokens per generated log line / prose sentence, measured with the SmolLM2
#: tokenizer: long prompts come out within a few % of their target, plus the
#: chat template (~45 tokens). Other tokenizers differ somewhat.
_LOG_TOKENS_PER_LINE = 40
_PROSE_TOKENS_PER_SENTENCE = 12


def _log_line(rng: random.Random, t: int) -> str:
    return (f"2024-05-{1 + t // 86400 % 28:02d} {t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d} "
            f"{rng.choice(_LEVELS)} {rng.choice(_SERVICES)}: {rng.choice(_ADJS)} {rng.choice(_NOUNS)} "
            f"{rng.choice(_VERBS)} request {rng.randrange(10000)} in {rng.randrange(1, 900)} ms")


def _sentence(rng: random.Random) -> str:
    return (f"The {rng.choice(_ADJS)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the "
            f"{rng.choice(_NOUNS)} near the {rng.choice(_ADJS)} {rng.choice(_NOUNS)}.")


def prompt_messages(req: PlannedRequest) -> list[dict[str, str]]:
    """The chat messages of a planned request (deterministic for its text_seed).

    Short: one templated question (40-50 tokens with SmolLM2's chat
    template). Long: a generated server log or prose of about
    ``prompt_tokens`` tokens (with the repetition real logs and documents
    have) and a task that makes the model copy from it or summarise it."""
    rng = random.Random(req.text_seed)
    if req.kind == "short":
        text = rng.choice(_SHORT_TEMPLATES).format(
            adj=rng.choice(_ADJS), noun=rng.choice(_NOUNS), noun2=rng.choice(_NOUNS),
            verb=rng.choice(_VERBS))
        return [{"role": "user", "content": text}]
    if rng.random() < 0.5:
        t0 = rng.randrange(10 ** 6)
        n = max(1, req.prompt_tokens // _LOG_TOKENS_PER_LINE)
        lines = [_log_line(rng, t0 + 7 * j) for j in range(n)]
        doc, word, word2 = "\n".join(lines), "ERROR", "FAILURE"
    else:
        n = max(1, req.prompt_tokens // _PROSE_TOKENS_PER_SENTENCE)
        sents = [_sentence(rng) for _ in range(n)]
        doc = "\n".join(" ".join(sents[j:j + 5]) for j in range(0, n, 5))
        word, word2 = rng.choice(_NOUNS), rng.choice(_NOUNS)
    task = rng.choice(_LONG_TASKS).format(word=word, word2=word2)
    return [{"role": "user", "content": f"{doc}\n\n{task}"}]


# ==========================================================================
# Streaming with aborts
# ==========================================================================
@dataclass
class RequestOutcome:
    index: int
    outcome: str = "error"              # "completed" | "aborted" | "error"
    chunks: int = 0                     # content-bearing chunks received
    prompt_tokens: Optional[int] = None  # from the usage chunk (completed requests only)
    completion_tokens: Optional[int] = None
    error: Optional[str] = None


def request_body(model: str, req: PlannedRequest) -> dict[str, Any]:
    body = {"model": model, "messages": prompt_messages(req), "max_tokens": req.max_tokens,
            "temperature": req.temperature, "stream": True,
            "stream_options": {"include_usage": True},
            # every request runs to its max_tokens (or its abort): the mix of
            # lengths is the one configured, not where the model happens to stop
            "ignore_eos": True}
    # No per-request "seed": on vLLM 0.32's CPU build a seeded request whose
    # prompt is prefilled in chunks kills the engine ("CPU Generator does not
    # use offset" in the runner's _bookkeeping_sync). Sampled outputs are not
    # reproducible then; the schedule (lengths, aborts) still is.
    return body


async def stream_request(session: Any, url: str, body: dict, abort_after_chunks: Optional[int],
                         timeout: float, index: int = -1) -> RequestOutcome:
    """Send one streaming chat request; with ``abort_after_chunks`` close the
    connection after that many content chunks (0: right after the headers),
    which makes vLLM abort the request. Never raises for request errors."""
    import aiohttp

    from vllm_spec_plugins.bench.online import _sse_payloads

    rec = RequestOutcome(index=index)
    done = False
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:300]}"
                return rec
            if abort_after_chunks == 0:
                resp.close()  # drops the connection: the server sees the client leave
                rec.outcome = "aborted"
                return rec
            buffer = bytearray()
            async for data in resp.content.iter_any():
                buffer += data.replace(b"\r\n", b"\n")
                for payload in _sse_payloads(buffer):
                    if payload.strip() == "[DONE]":
                        done = True
                        continue
                    try:
                        chunk = json.loads(payload)
                    except json.JSONDecodeError:
                        rec.error = f"bad SSE payload: {payload[:200]}"
                        continue
                    if isinstance(chunk, dict) and chunk.get("error"):
                        err = chunk["error"]
                        rec.error = "server error in stream: " + (
                            err.get("message", str(err)) if isinstance(err, dict) else str(err))
                        continue
                    usage = chunk.get("usage")
                    if usage:
                        rec.prompt_tokens = usage.get("prompt_tokens")
                        rec.completion_tokens = usage.get("completion_tokens")
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                        rec.chunks += 1
                        if abort_after_chunks is not None and rec.chunks >= abort_after_chunks:
                            resp.close()
                            rec.outcome = "aborted"
                            return rec
    except asyncio.CancelledError:
        raise
    except Exception as e:  # connection refused/reset, timeout, ...
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return rec
    if rec.error is None and not done:
        rec.error = "stream ended without [DONE]"
    if rec.error is None:
        rec.outcome = "completed"
    return rec


async def run_batch(session: Any, url: str, model: str, batch: Sequence[PlannedRequest], *,
                    concurrency: int, timeout: float,
                    on_done: Optional[Callable[[RequestOutcome], Any]] = None) -> list[RequestOutcome]:
    """Send ``batch`` with at most ``concurrency`` in flight; returns when all finished."""
    queue = list(reversed(batch))
    results: list[RequestOutcome] = []

    async def worker() -> None:
        while queue:
            req = queue.pop()
            rec = await stream_request(session, url, request_body(model, req),
                                       req.abort_after_chunks, timeout, req.index)
            results.append(rec)
            if on_done is not None:
                on_done(rec)

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, len(batch))))))
    return sorted(results, key=lambda r: r.index)


# ==========================================================================
# Measuring the server
# ==========================================================================
def process_role(title: str, is_root: bool) -> str:
    """``api_server`` (the root), ``engine_core``, ``worker`` or ``other``, from a
    process's cmdline / name (vLLM titles its processes ``VLLM::EngineCore``,
    ``VLLM::Worker...``)."""
    if is_root:
        return "api_server"
    if "EngineCore" in title:
        return "engine_core"
    if "Worker" in title:
        return "worker"
    return "other"


ROLES = ("api_server", "engine_core", "worker", "other")


def process_tree_memory(root_pid: int) -> dict[str, Any]:
    """RSS in bytes of the server's process tree: per role, ``engine``
    (engine core + workers) and ``total``; ``processes`` lists each one."""
    import psutil

    try:
        root = psutil.Process(root_pid)
        procs = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return {"total": None, "engine": None, "processes": []}
    by_role = dict.fromkeys(ROLES, 0)
    rows = []
    for p in procs:
        try:
            rss = int(p.memory_info().rss)
            title = " ".join(p.cmdline()) or p.name()
            name = p.name()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue  # gone between listing and reading
        role = process_role(f"{title} {name}", p.pid == root_pid)
        by_role[role] += rss
        rows.append({"pid": p.pid, "role": role, "title": title[:120], "rss": rss})
    engine = by_role["engine_core"] + by_role["worker"]
    return {**by_role, "engine": engine if engine else None, "total": sum(by_role.values()),
            "processes": rows}


def _post_json(url: str, body: dict, timeout: float = 60.0) -> tuple[int, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            text = r.read().decode("utf-8", errors="replace")
            return r.status, (json.loads(text) if text.strip() else None)
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")[:300]


def collective_rpc(base_url: str, method: str, timeout: float = 60.0) -> Any:
    """The first worker's answer to a dev-mode ``/collective_rpc`` call."""
    status, body = _post_json(base_url.rstrip("/") + "/collective_rpc",
                              {"method": method, "timeout": timeout}, timeout + 5)
    if status != 200:
        raise RuntimeError(f"/collective_rpc {method}: HTTP {status}: {body}")
    results = (body or {}).get("results") if isinstance(body, dict) else None
    return results[0] if results else None


def finish_reasons(base_url: str) -> dict[str, int]:
    """Finished requests by reason (``stop``, ``length``, ...) from ``/metrics``.
    vLLM 0.32 does not count aborted requests there, so these minus the
    requests read to the end (and the warm-up) are aborts that came too late
    to stop their request."""
    from vllm_spec_plugins.bench.online import _http_get, _samples

    status, text = _http_get(base_url.rstrip("/") + "/metrics", timeout=30)
    if status != 200:
        return {}
    out: dict[str, float] = {}
    for name, labels, value in _samples(text):
        if name == "vllm:request_success_total":
            reason = labels.get("finished_reason", "?")
            out[reason] = out.get(reason, 0.0) + value
    return {k: int(round(v)) for k, v in sorted(out.items())}


def take_sample(root_pid: int, base_url: str, requests_done: int, t0: float,
                probe: bool) -> dict[str, Any]:
    mem = process_tree_memory(root_pid)
    sample = {"requests": requests_done, "elapsed_s": round(time.perf_counter() - t0, 2),
              "rss": {k: mem[k] for k in ("engine", "total", *ROLES)},
              "processes": len(mem["processes"]), "probe": None}
    if probe:
        try:
            sample["probe"] = collective_rpc(base_url, "vsp_soak_probe")
        except Exception as e:  # the probe is extra: never lose the RSS sample over it
            sample["probe"] = {"error": f"{type(e).__name__}: {e}"}
    return sample


# ==========================================================================
# One method
# ==========================================================================
def soak_method(cfg: SoakConfig, method: MethodSpec, model_path: str,
                schedule: Sequence[PlannedRequest], log_dir: Path, env: dict,
                result: dict[str, Any], bar: Any = None) -> dict[str, Any]:
    """Serve ``method`` and run the schedule, filling ``result`` as it goes (so
    an interrupted run keeps its samples). Never raises for a failed run:
    ``result["status"]`` is ``ok`` or ``failed`` with ``error``."""
    from vllm_spec_plugins.bench.online import ServerError, ServerProcess, free_port, server_command

    result.update({"label": method.label, "status": "failed", "error": None, "samples": [],
                   "requests": [], "finish_reasons": None, "after_trim": None, "processes": None})
    try:
        kwargs = engine_kwargs(method, model=model_path, dtype=cfg.dtype, seed=cfg.seed, k=cfg.k,
                               kv_cache_bytes=cfg.kv_cache_bytes, plugin_config=cfg.plugin_config,
                               enforce_eager=cfg.enforce_eager)
        if cfg.probe:
            kwargs["worker_extension_cls"] = PROBE_CLASS
        host = "127.0.0.1"
        port = free_port(host)
        base_url = f"http://{host}:{port}"
        cmd = server_command(kwargs, host=host, port=port)
        result["command"] = cmd
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in method.label)
        with ServerProcess(cmd, base_url=base_url, model=model_path, env=env,
                           stdout_log=log_dir / f"{stem}.stdout.log",
                           stderr_log=log_dir / f"{stem}.stderr.log") as srv:
            result["stderr_log"] = str(srv.stderr_log)
            result["startup_s"] = round(srv.wait_ready(cfg.startup_timeout), 1)
            asyncio.run(_drive(cfg, srv, base_url, model_path, schedule, result, bar))
            result["finish_reasons"] = finish_reasons(base_url)
            if cfg.probe:
                before = process_tree_memory(srv.pid)
                if collective_rpc(base_url, "vsp_soak_malloc_trim"):
                    after = process_tree_memory(srv.pid)
                    result["after_trim"] = {"engine_before": before["engine"],
                                            "engine_after": after["engine"]}
            srv.check_alive("at the end of the run")
        result["status"] = "ok"
    except Exception as e:
        result["error"] = str(e) if isinstance(e, (ServerError, ValueError)) else f"{type(e).__name__}: {e}"
    return result


async def _drive(cfg: SoakConfig, srv: Any, base_url: str, model: str,
                 schedule: Sequence[PlannedRequest], result: dict[str, Any], bar: Any) -> None:
    import aiohttp

    from vllm_spec_plugins.bench.online import WARMUP_MAX_TOKENS, WARMUP_MESSAGES, ServerError

    url = base_url + "/v1/chat/completions"
    t0 = time.perf_counter()
    counts = result["counts"] = {"completed": 0, "aborted": 0, "error": 0}

    def on_done(rec: RequestOutcome) -> None:
        counts[rec.outcome] += 1
        if bar is not None:
            bar.update(1)

    # A fresh connection per request: between batches the pool sits idle while
    # memory is sampled, the server drops idle keep-alive connections, and a
    # request sent on one that is just closing fails ("Can not write request
    # body"; seen in the smoke run). A connection costs nothing next to a request.
    connector = aiohttp.TCPConnector(limit=cfg.concurrency + 2, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        warm = await stream_request(session, url, {
            "model": model, "messages": WARMUP_MESSAGES, "max_tokens": WARMUP_MAX_TOKENS,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}},
            None, cfg.request_timeout)
        if warm.error:
            srv.check_alive("during the warm-up request")
            raise ServerError(f"warm-up request failed: {warm.error}")
        first = take_sample(srv.pid, base_url, 0, t0, cfg.probe)
        result["processes"] = process_tree_memory(srv.pid)["processes"]
        result["samples"].append(first)
        for start in range(0, len(schedule), cfg.sample_every):
            batch = schedule[start:start + cfg.sample_every]
            recs = await run_batch(session, url, model, batch, concurrency=cfg.concurrency,
                                   timeout=cfg.request_timeout, on_done=on_done)
            result["requests"] += [asdict(r) for r in recs]
            srv.check_alive(f"after {start + len(batch)} requests")
            done = start + len(batch)
            if counts["error"] > max(5, MAX_ERROR_SHARE * done):
                first_err = next(r["error"] for r in result["requests"] if r["error"])
                raise ServerError(f"{counts['error']} of {done} requests failed; first error: "
                                  f"{first_err}")
            await asyncio.sleep(SETTLE_S)
            sample = take_sample(srv.pid, base_url, done, t0, cfg.probe)
            result["samples"].append(sample)
            if bar is not None:
                eng = sample["rss"]["engine"] or sample["rss"]["total"] or 0
                bar.set_postfix_str(f"engine {eng / MB:.0f} MB, aborted {counts['aborted']}, "
                                    f"errors {counts['error']}")
    result["wall_s"] = round(time.perf_counter() - t0, 1)


# ==========================================================================
# Verdicts
# ==========================================================================
def slope_per_1000(points: Sequence[tuple[float, float]]) -> Optional[float]:
    """Least-squares slope of (requests, MB) points in MB per 1000 requests;
    None with fewer than two distinct request counts."""
    if len(points) < 2:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return 1000.0 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def series(samples: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """(requests, MB) of one memory figure: an ``rss`` key (``engine``,
    ``total``, ...) or ``plugin_state`` (the probe's state bytes)."""
    pts = []
    for s in samples:
        if key == "plugin_state":
            plugin = (s.get("probe") or {}).get("plugin") or {}
            value = plugin.get("state_bytes")
        else:
            value = (s.get("rss") or {}).get(key)
        if value is not None:
            pts.append((float(s["requests"]), value / MB))
    return pts


def growth_verdict(points: Sequence[tuple[float, float]], *, level_slope: float,
                   level_fraction: float) -> dict[str, Any]:
    """Slopes of the first and second half of the run (the sample at the
    middle, if any, belongs to both) and whether the memory levels off:
    second-half slope < ``level_slope``, or < ``level_fraction`` x the first
    half's. Verdicts: ``flat`` (both halves under the threshold), ``levels
    off``, ``levels off (relative rule only)`` (slowing, but the second half
    still above the threshold), ``still growing``, ``too few samples``."""
    out: dict[str, Any] = {"start_mb": None, "warm_mb": None, "warm_at": None, "end_mb": None,
                           "first_half_slope": None, "second_half_slope": None,
                           "levels_off": None, "verdict": "too few samples", "reason": ""}
    if not points:
        out["verdict"] = "no data"
        return out
    n_end = points[-1][0]
    warm = next((p for p in points if p[0] > 0 and p[0] >= WARMUP_SHARE * n_end), points[-1])
    out.update(start_mb=points[0][1], warm_mb=warm[1], warm_at=int(warm[0]), end_mb=points[-1][1])
    mid = (points[0][0] + n_end) / 2
    first = [p for p in points if p[0] <= mid]
    second = [p for p in points if p[0] >= mid]
    s1, s2 = slope_per_1000(first), slope_per_1000(second)
    out.update(first_half_slope=s1, second_half_slope=s2)
    if s1 is None or s2 is None:
        out["reason"] = "a verdict needs two samples in each half of the run"
        return out
    if s2 < level_slope and s1 < level_slope:
        verdict, levels, why = "flat", True, f"both halves < {level_slope:g} MB/1000 req"
    elif s2 < level_slope:
        verdict, levels, why = "levels off", True, f"second half < {level_slope:g} MB/1000 req"
    elif s1 > 0 and s2 < level_fraction * s1:
        verdict, levels = "levels off (relative rule only)", True
        why = (f"second half {s2:.1f} < {level_fraction:g} x first half {s1:.1f} MB/1000 req, "
               f"but above {level_slope:g}")
    else:
        verdict, levels = "still growing", False
        why = (f"second half {s2:.1f} MB/1000 req >= {level_slope:g} and >= "
               f"{level_fraction:g} x first half")
    out.update(verdict=verdict, levels_off=levels, reason=why)
    return out


def compare_with_baseline(mine: dict, base: dict, state: dict, *, level_slope: float) -> dict[str, Any]:
    """What a method adds over ``none``: the difference of the second-half
    slopes and of the growth after warm-up (engine RSS), the part of it the
    plugin's own bounded state accounts for (``state``: growth_verdict of the
    probe's state bytes), and whether the added growth levels off."""
    out: dict[str, Any] = {"excess_second_half_slope": None, "excess_growth_after_warmup_mb": None,
                           "state_second_half_slope": state.get("second_half_slope"),
                           "state_growth_after_warmup_mb": None,
                           "added_growth_levels_off": None, "verdict": "no baseline data"}
    if mine.get("second_half_slope") is None or base.get("second_half_slope") is None:
        return out
    excess = mine["second_half_slope"] - base["second_half_slope"]
    out["excess_second_half_slope"] = excess
    if None not in (mine["end_mb"], mine["warm_mb"], base["end_mb"], base["warm_mb"]):
        out["excess_growth_after_warmup_mb"] = ((mine["end_mb"] - mine["warm_mb"])
                                                - (base["end_mb"] - base["warm_mb"]))
    if state.get("end_mb") is not None and state.get("warm_mb") is not None:
        out["state_growth_after_warmup_mb"] = state["end_mb"] - state["warm_mb"]
    out["added_growth_levels_off"] = excess < level_slope
    state_slope = state.get("second_half_slope")
    if excess < level_slope:
        out["verdict"] = f"adds {excess:+.1f} MB/1000 req over none: levels off"
    else:
        out["verdict"] = f"adds {excess:+.1f} MB/1000 req over none: still growing"
    if state_slope is not None:
        out["verdict"] += (f" (its bounded cross-request state grows {state_slope:+.1f} "
                           "MB/1000 req)")
    return out


def compute_verdicts(methods: dict[str, dict], *, level_slope: float,
                     level_fraction: float) -> dict[str, dict]:
    """Per method: engine and whole-tree growth verdicts, the plugin state's
    growth, whether the request table drained at every sample, and the
    comparison with ``none`` when it ran."""
    kw = {"level_slope": level_slope, "level_fraction": level_fraction}
    out: dict[str, dict] = {}
    for label, res in methods.items():
        samples = res.get("samples") or []
        engine_key = "engine" if any((s["rss"] or {}).get("engine") for s in samples) else "total"
        tracked = [((s.get("probe") or {}).get("plugin") or {}).get("tracked_requests")
                   for s in samples[1:]]
        tracked = [t for t in tracked if t is not None]
        out[label] = {"engine_series": engine_key,
                      "engine": growth_verdict(series(samples, engine_key), **kw),
                      "total": growth_verdict(series(samples, "total"), **kw),
                      "plugin_state": growth_verdict(series(samples, "plugin_state"), **kw),
                      "max_tracked_requests_when_idle": max(tracked) if tracked else None}
    base = out.get(BASELINE)
    for label, v in out.items():
        if label != BASELINE and base is not None:
            v["vs_none"] = compare_with_baseline(v["engine"], base["engine"], v["plugin_state"],
                                                 level_slope=level_slope)
    return out


# ==========================================================================
# Report
# ==========================================================================
def _mb(v: Optional[float], fmt: str = "{:.0f}") -> str:
    return "–" if v is None else fmt.format(v)


def render_markdown(data: dict[str, Any]) -> str:
    cfg = data["config"]
    verdicts = data.get("verdicts") or {}
    lines = [f"# Memory soak: {cfg['model']}", "",
             f"{cfg['requests']} streamed chat requests per method, concurrency "
             f"{cfg['concurrency']}, {cfg['long_fraction']:.0%} long prompts "
             f"(~{cfg['long_prompt_tokens'][0]}–{cfg['long_prompt_tokens'][1]} tokens), "
             f"max_tokens {cfg['max_tokens'][0]}–{cfg['max_tokens'][1]}, "
             f"{cfg['abort_fraction']:.0%} aborted mid-stream; {cfg['dtype']}, k = {cfg['k']}, "
             f"KV cache {cfg['kv_cache_gb']:g} GiB, seed {cfg['seed']}. Memory sampled every "
             f"{cfg['sample_every']} requests with the load drained. Slopes: least squares, MB "
             "per 1000 requests. Levels off: second-half slope < "
             f"{cfg['level_slope']:g}, or < {cfg['level_fraction']:g} x the first half's.", "",
             "## Engine processes (engine core + worker; the model, KV cache and plugin run "
             "in the worker)", "",
             "| method | status | RSS start MB | after warm-up MB | end MB | slope 1st half | "
             "slope 2nd half | verdict | vs none |",
             "|---|---|--:|--:|--:|--:|--:|---|---|"]
    for label, res in data["methods"].items():
        v = verdicts.get(label, {})
        e = v.get("engine", {})
        warm = f"{_mb(e.get('warm_mb'))} (@{e.get('warm_at')})" if e.get("warm_mb") is not None else "–"
        status = res.get("status", "?") if res.get("status") == "ok" else f"FAILED: {res.get('error')}"
        vs = v.get("vs_none", {}).get("verdict", "baseline" if label == BASELINE else "–")
        lines.append(f"| {label} | {status} | {_mb(e.get('start_mb'))} | {warm} | "
                     f"{_mb(e.get('end_mb'))} | {_mb(e.get('first_half_slope'), '{:+.1f}')} | "
                     f"{_mb(e.get('second_half_slope'), '{:+.1f}')} | {e.get('verdict', '–')} | "
                     f"{vs} |")
    lines += ["", "## Whole server process tree (API server + engine + helpers)", "",
              "| method | RSS start MB | end MB | slope 1st half | slope 2nd half | verdict |",
              "|---|--:|--:|--:|--:|---|"]
    for label in data["methods"]:
        t = verdicts.get(label, {}).get("total", {})
        lines.append(f"| {label} | {_mb(t.get('start_mb'))} | {_mb(t.get('end_mb'))} | "
                     f"{_mb(t.get('first_half_slope'), '{:+.1f}')} | "
                     f"{_mb(t.get('second_half_slope'), '{:+.1f}')} | {t.get('verdict', '–')} |")
    lines += ["", "## Each process, RSS MB at start → end", "",
              "| method | " + " | ".join(ROLES) + " |", "|---|" + "--:|" * len(ROLES)]
    for label, res in data["methods"].items():
        samples = res.get("samples") or []
        cells = []
        for role in ROLES:
            pts = series(samples, role)
            cells.append(f"{pts[0][1]:.0f} → {pts[-1][1]:.0f}" if pts and pts[-1][1] else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Requests and the plugin's state", "",
              "| method | completed | aborted | errors | finished in the engine | "
              "aborted but ran to the end | "
              "max tracked requests when idle | plugin state MB start → end | "
              "Python objects start → end | engine RSS after malloc_trim MB |",
              "|---|--:|--:|--:|---|--:|--:|---|---|--:|"]
    for label, res in data["methods"].items():
        v = verdicts.get(label, {})
        counts = res.get("counts") or {}
        st = v.get("plugin_state", {})
        state = (f"{_mb(st.get('start_mb'), '{:.1f}')} → {_mb(st.get('end_mb'), '{:.1f}')}"
                 if st.get("start_mb") is not None else "–")
        objs = [((s.get("probe") or {}).get("gc_objects")) for s in res.get("samples") or []]
        objs = [o for o in objs if o is not None]
        objs_s = f"{objs[0]:,} → {objs[-1]:,}" if objs else "–"
        trim = res.get("after_trim") or {}
        trimmed = "–"
        if trim.get("engine_before") and trim.get("engine_after"):
            trimmed = (f"{trim['engine_after'] / MB:.0f} "
                       f"(−{(trim['engine_before'] - trim['engine_after']) / MB:.0f})")
        fin = res.get("finish_reasons") or {}
        reasons = ", ".join(f"{k} {n}" for k, n in fin.items() if n) or "–"
        # vLLM does not count aborted requests here: every request that ran to
        # its end is one we read to the end, or the warm-up, or an abort that
        # came too late
        ran_out = (sum(n for k, n in fin.items() if k != "abort") - counts["completed"] - 1
                   if fin and "completed" in counts else None)
        tracked = v.get("max_tracked_requests_when_idle")
        lines.append(f"| {label} | {counts.get('completed', '–')} | {counts.get('aborted', '–')} | "
                     f"{counts.get('error', '–')} | {reasons} | {'–' if ran_out is None else ran_out} | "
                     f"{'–' if tracked is None else tracked} | {state} | {objs_s} | "
                     f"{trimmed} |")
    lines += ["", "Processes are told apart by their titles (`VLLM::EngineCore`, `VLLM::Worker`); "
              "the model, the KV cache and the plugin run in the worker. "
              "*Finished in the engine*: vLLM's `request_success` counter by reason, warm-up "
              "request included; aborted requests are not counted there, so *aborted but ran to "
              "the end* = finished − completed − 1 (0: every abort reached the engine in time). "
              "*Tracked requests when idle*: the plugin's request table after each drained batch "
              "(0 = every finished and aborted request was released). *Plugin state*: the "
              "suffix-tree global cache / Token Recycling matrix, bounded by their settings. "
              "*After malloc_trim*: engine RSS once `malloc_trim(0)` ran in the worker at the end "
              "(in brackets what it gave back: freed memory the C allocator had kept, not live "
              "data); compare it with the start."]
    for note in cfg.get("notes") or []:
        lines.append(f"\n{note}")
    return "\n".join(lines) + "\n"


def plot_rss(data: dict[str, Any], path: Path) -> None:
    """RSS vs requests served, one line per method: engine processes and the
    whole server tree side by side (plus the plugin's state when probed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("engine", "engine processes RSS (MB)"), ("total", "whole server tree RSS (MB)")]
    has_state = any(series(r.get("samples") or [], "plugin_state") for r in data["methods"].values())
    if has_state:
        panels.append(("plugin_state", "plugin cross-request state (MB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels):
        for label, res in data["methods"].items():
            samples = res.get("samples") or []
            use = key
            if key == "engine" and not series(samples, "engine"):
                use = "total"
            pts = series(samples, use)
            if pts:
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                                markersize=3, label=label)
                trim = res.get("after_trim") or {}
                if key == "engine" and use == "engine" and trim.get("engine_after"):
                    ax.plot([pts[-1][0]], [trim["engine_after"] / MB], marker="x", markersize=8,
                            color=line.get_color(), linestyle="none",
                            label=f"{label} after malloc_trim")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("requests served")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    cfg = data["config"]
    fig.suptitle(f"Memory soak: {cfg['requests']} requests, concurrency {cfg['concurrency']}, "
                 f"{cfg['abort_fraction']:.0%} aborted", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(data: dict[str, Any], out: Path) -> list[Path]:
    """results.json, results.md and rss.png under ``out`` (verdicts computed
    here from the samples). A plot failure is reported, never fatal."""
    out.mkdir(parents=True, exist_ok=True)
    cfg = data["config"]
    data["verdicts"] = compute_verdicts(data["methods"], level_slope=cfg["level_slope"],
                                        level_fraction=cfg["level_fraction"])
    (out / "results.json").write_text(json.dumps(data, indent=1))
    (out / "results.md").write_text(render_markdown(data))
    written = [out / "results.json", out / "results.md"]
    try:
        plot_rss(data, out / "rss.png")
        written.append(out / "rss.png")
    except Exception as e:  # a plot problem must not lose the measurements
        print(f"warning: could not draw the plot: {type(e).__name__}: {e}", file=sys.stderr)
    return written


# ==========================================================================
# The whole soak
# ==========================================================================
def _config_record(cfg: SoakConfig, model_path: str) -> dict[str, Any]:
    rec = asdict(cfg)
    rec["methods"] = [asdict(m) for m in cfg.methods]
    rec.update(model_path=model_path, max_model_len=MAX_MODEL_LEN, warmup_share=WARMUP_SHARE,
               python=platform.python_version(), cpus=os.cpu_count())
    return rec


def run_soak(cfg: SoakConfig) -> int:
    from tqdm import tqdm

    from vllm_spec_plugins.bench.runner import WORKER_ENV, resolve_model_path

    for note in cfg.notes:
        print(note, file=sys.stderr)
    validate_plugin_settings(cfg.methods, cfg.plugin_config)
    if importlib.util.find_spec("matplotlib") is None:
        raise RuntimeError("the soak's plot needs matplotlib: `pip install matplotlib`")
    if importlib.util.find_spec("psutil") is None:
        raise RuntimeError("the soak reads process memory with psutil: `pip install psutil`")
    model_path = resolve_model_path(cfg.model)
    schedule = build_schedule(cfg.requests, abort_fraction=cfg.abort_fraction,
                              long_fraction=cfg.long_fraction,
                              long_prompt_tokens=cfg.long_prompt_tokens,
                              max_tokens=cfg.max_tokens, seed=cfg.seed)
    out = Path(cfg.out)
    env = dict(os.environ, **WORKER_ENV, **cfg.server_env)
    if cfg.probe:
        env["VLLM_SERVER_DEV_MODE"] = "1"  # enables /collective_rpc (localhost only here)
    data: dict[str, Any] = {"config": _config_record(cfg, model_path),
                            "schedule": schedule_summary(schedule),
                            "started": time.time(), "methods": {}}
    interrupted = False
    try:
        for method in cfg.methods:
            result: dict[str, Any] = {}
            data["methods"][method.label] = result
            with tqdm(total=len(schedule), desc=f"soak {method.label}", unit="req",
                      file=sys.stderr, dynamic_ncols=True) as bar:
                soak_method(cfg, method, model_path, schedule, out / "logs", env, result, bar)
            if result["status"] != "ok":
                print(f"error: method {method.label!r} failed: {result['error']}"
                      + (f" (log: {result['stderr_log']})" if result.get("stderr_log") else ""),
                      file=sys.stderr)
            data["finished"] = time.time()
            write_report(data, out)  # after every method: a stopped soak keeps its data
    except KeyboardInterrupt:
        interrupted = True
        for result in data["methods"].values():
            if result.get("status") != "ok":
                result.update(status="interrupted", error="stopped by the user")
        print("interrupted: writing what was measured", file=sys.stderr)
    written = write_report(data, out)
    print((out / "results.md").read_text())
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    if interrupted:
        return 130
    failed = [label for label, r in data["methods"].items()
              if r.get("status") != "ok" or (r.get("counts") or {}).get("error")]
    if failed:
        print(f"error: failed runs or failed requests in: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def run_from_args(args: argparse.Namespace) -> int:
    """Turns SIGTERM into KeyboardInterrupt while it runs, so a killed soak
    still stops its server (which runs in its own session) and writes its data."""
    import signal
    import threading

    cfg = config_from_args(args)
    if threading.current_thread() is not threading.main_thread():
        return run_soak(cfg)

    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        return run_soak(cfg)
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_spec_plugins.bench.soak",
                                 description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(argv)
    try:
        return run_from_args(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # user-fixable: one line
        print(f"soak: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
