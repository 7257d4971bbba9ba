"""Online benchmark mode: one method behind vLLM's OpenAI-compatible server.

The offline mode (``runner.py``) times ``LLM.generate`` on whole batches. This
module measures what a user of a server sees: streaming chat completions sent
under a fixed concurrency, with time to first token (TTFT), gaps between
streamed chunks (ITL), time per output token (TPOT) and throughput.

Pieces, each usable on its own:

* :func:`server_command` -- the ``LLM(...)`` keyword dict of a method
  (``runner.engine_kwargs``) as ``python -m vllm.entrypoints.openai.api_server``
  flags.
* :class:`ServerProcess` -- starts that command in its own session, waits until
  ``/health`` answers and ``/v1/models`` lists the model, and stops the whole
  process group (API server, engine core, workers) on exit.
* :func:`parse_prometheus_spec_counters` / :func:`fetch_spec_counters` -- the
  spec-decode counters from ``/metrics``, in the shape of
  ``runner.spec_counters``.
* :func:`run_load` -- the load generator (asyncio + aiohttp, both already vLLM
  dependencies). Conversations with follow-up turns are chains: turn ``t+1`` is
  sent after turn ``t`` finished, with the assistant's answer in its history.
* :func:`run_method_online` -- all of the above for one method and a list of
  workloads and concurrency levels; returns a JSON-serialisable dict.

The benchmark parent process imports this module, so it must never import vLLM:
the server runs in a subprocess and everything here is stdlib + aiohttp.

Timing notes. With speculative decoding one step can emit several tokens, and
vLLM streams them as *one* SSE chunk (e.g. ``" sat on"``), so chunk gaps (ITL
here) are gaps between engine steps that produced output for the request, not
per-token gaps. TPOT = (latency - TTFT) / (completion_tokens - 1) is the
per-token figure; it goes down when more tokens are accepted per step.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = [
    "ServerError",
    "ServerProcess",
    "RequestRecord",
    "LoadResult",
    "server_command",
    "free_port",
    "parse_prometheus_spec_counters",
    "fetch_spec_counters",
    "spec_counters_delta",
    "run_load",
    "run_load_async",
    "conversation_texts",
    "run_method_online",
    "WARMUP_MESSAGES",
    "WARMUP_MAX_TOKENS",
]

API_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
WARMUP_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
WARMUP_MAX_TOKENS = 8
STOP_GRACE_S = 20.0          # SIGTERM -> SIGKILL
LOG_TAIL_LINES = 200

# ==========================================================================
# Server command line
# ==========================================================================
# LLM(...) keyword -> api_server flag and how its value is written.
_VALUE_FLAGS = {
    "model": ("--model", str),
    "dtype": ("--dtype", str),
    "kv_cache_memory_bytes": ("--kv-cache-memory-bytes", lambda v: str(int(v))),
    "max_model_len": ("--max-model-len", lambda v: str(int(v))),
    "seed": ("--seed", lambda v: str(int(v))),
    "speculative_config": ("--speculative-config", lambda v: json.dumps(v, sort_keys=True)),
    "additional_config": ("--additional-config", lambda v: json.dumps(v, sort_keys=True)),
    "worker_extension_cls": ("--worker-extension-cls", str),
}
# Boolean keywords: flag passed only when the value is true (both default to False).
_BOOL_FLAGS = {
    "disable_log_stats": "--disable-log-stats",   # would also empty /metrics of spec counters
    "enforce_eager": "--enforce-eager",
}
SUPPORTED_ENGINE_KWARGS = tuple(sorted([*_VALUE_FLAGS, *_BOOL_FLAGS]))


def server_command(engine_kwargs: dict, *, host: str, port: int, python: str = sys.executable,
                   served_model_name: Optional[str] = None) -> list[str]:
    """``LLM(**engine_kwargs)`` as an OpenAI api_server command line.

    Supported keys: ``model`` (required), ``dtype``, ``kv_cache_memory_bytes``,
    ``max_model_len``, ``seed``, ``worker_extension_cls``, ``speculative_config`` and ``additional_config``
    (dicts, passed as JSON), ``disable_log_stats`` and ``enforce_eager`` (booleans;
    a flag only when true). A value of ``None`` is left out. Any other key raises
    ``ValueError`` naming it. The uvicorn access log (one line per request) is off.
    """
    unknown = sorted(k for k in engine_kwargs if k not in _VALUE_FLAGS and k not in _BOOL_FLAGS)
    if unknown:
        raise ValueError(f"server_command: unsupported engine keyword(s) {', '.join(map(repr, unknown))}; "
                         f"supported: {', '.join(SUPPORTED_ENGINE_KWARGS)}")
    if not engine_kwargs.get("model"):
        raise ValueError("server_command: engine keyword 'model' is required")
    cmd = [python, "-m", API_SERVER_MODULE]
    for key, (flag, fmt) in _VALUE_FLAGS.items():
        value = engine_kwargs.get(key)
        if value is None:
            continue
        if key in ("speculative_config", "additional_config") and not isinstance(value, dict):
            raise ValueError(f"server_command: {key!r} must be a dict, got {type(value).__name__}")
        cmd += [flag, fmt(value)]
    for key, flag in _BOOL_FLAGS.items():
        value = engine_kwargs.get(key)
        if value is None:
            continue
        if not isinstance(value, bool):
            raise ValueError(f"server_command: {key!r} must be a bool, got {value!r}")
        if value:
            cmd.append(flag)
    if served_model_name:
        cmd += ["--served-model-name", served_model_name]
    cmd += ["--host", str(host), "--port", str(int(port)), "--disable-uvicorn-access-log"]
    return cmd


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# ==========================================================================
# Server process
# ==========================================================================
class ServerError(RuntimeError):
    """The server exited early, did not become ready, or died during a run."""


_ERROR_LINE = re.compile(r"^\s*(?:\(\w+ pid=\d+\)\s*)?([A-Za-z_][\w.]*(?:Error|Exception|Exit)\b:?.*)$")
_GENERIC_ERRORS = ("Engine core initialization failed", "EngineDeadError", "See root cause above")
_NOISE = re.compile(r"(Warning|warnings\.warn|^\s*\w+Warning:|Completed \||it/s\]|^\s*$)")


def _error_messages(lines: Sequence[str]) -> list[str]:
    """``SomeError: ...`` lines (warnings excluded), each joined with its indented
    continuation lines (``ValueError: ...:\n  field: why``)."""
    errors = []
    for i, line in enumerate(lines):
        m = _ERROR_LINE.match(line)
        if not m or re.match(r"^\w*Warning\b", m.group(1)):
            continue
        msg = m.group(1).strip()
        for cont in lines[i + 1:i + 6]:
            if not cont[:1].isspace() or not cont.strip() or cont.strip().startswith("File "):
                break
            msg += " " + cont.strip()
        errors.append(msg)
    return errors


def _pick_error(errors: Sequence[str]) -> str:
    specific = [e for e in errors if not any(g in e for g in _GENERIC_ERRORS)]
    return specific[-1] if specific else (errors[-1] if errors else "")


def last_meaningful_line(lines: Sequence[str]) -> str:
    """The most telling line of a log tail: the last ``SomeError: ...`` message
    that is not vLLM's generic "engine core initialization failed" wrapper, else
    the last such message, else the last line that is not a warning or a
    progress bar ("" if none)."""
    picked = _pick_error(_error_messages(lines))
    if picked:
        return picked
    for line in reversed(lines):
        if not _NOISE.search(line):
            return line.strip()
    return ""


def _read_tail(path: Optional[Path], n: int = LOG_TAIL_LINES) -> list[str]:
    if path is None:
        return []
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _http_get(url: str, timeout: float = 10.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode("utf-8", errors="replace")


class ServerProcess:
    """An api_server subprocess in its own session; a context manager.

    ``with ServerProcess(cmd, base_url=..., model=..., env=..., stdout_log=...,
    stderr_log=...) as srv: srv.wait_ready(600)`` -- entering starts it, leaving
    stops the whole process group (engine core and workers included).
    ``env`` is merged over ``os.environ``.
    """

    def __init__(self, command: Sequence[str], *, base_url: str, model: Optional[str] = None,
                 env: Optional[dict] = None, stdout_log: str | Path, stderr_log: str | Path,
                 stop_grace: float = STOP_GRACE_S):
        self.command = list(command)
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.env = dict(env or {})
        self.stdout_log = Path(stdout_log)
        self.stderr_log = Path(stderr_log)
        self.stop_grace = stop_grace
        self.proc: Optional[subprocess.Popen] = None

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "ServerProcess":
        if self.proc is not None:
            raise RuntimeError("server already started")
        self.stdout_log.parent.mkdir(parents=True, exist_ok=True)
        self.stderr_log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, **{k: str(v) for k, v in self.env.items()})
        with open(self.stdout_log, "wb") as fo, open(self.stderr_log, "wb") as fe:
            self.proc = subprocess.Popen(self.command, stdout=fo, stderr=fe, stdin=subprocess.DEVNULL,
                                         env=env, start_new_session=True)
        return self

    @property
    def pid(self) -> Optional[int]:
        return None if self.proc is None else self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def failure_cause(self) -> str:
        """Last meaningful line of the server's logs (stderr first, then stdout)."""
        err, out = _read_tail(self.stderr_log), _read_tail(self.stdout_log)
        return (_pick_error(_error_messages(err)) or _pick_error(_error_messages(out))
                or last_meaningful_line(err) or last_meaningful_line(out) or "(no log output)")

    def _exited_error(self, when: str) -> ServerError:
        rc = self.proc.returncode if self.proc is not None else None
        how = f"killed by signal {-rc}" if rc is not None and rc < 0 else f"exited with code {rc}"
        return ServerError(f"server {how} {when}: {self.failure_cause()} "
                           f"(logs: {self.stderr_log}, {self.stdout_log})")

    def check_alive(self, when: str = "during the run") -> None:
        """Raise :class:`ServerError` if the server process has exited."""
        if self.proc is None:
            raise ServerError("server not started")
        if self.proc.poll() is not None:
            raise self._exited_error(when)

    def wait_ready(self, timeout: float, poll: float = 0.5) -> float:
        """Block until ``/health`` is 200 and ``/v1/models`` lists the model.

        Returns the seconds waited. Raises :class:`ServerError` at once when the
        process exits, or after ``timeout`` seconds, with the last meaningful log
        line in the message."""
        if self.proc is None:
            raise ServerError("server not started")
        t0 = time.monotonic()
        deadline = t0 + timeout
        last = "no answer yet"
        while True:
            if self.proc.poll() is not None:
                raise self._exited_error("before it was ready")
            try:
                status, _ = _http_get(self.base_url + "/health", timeout=5)
                if status == 200:
                    status, body = _http_get(self.base_url + "/v1/models", timeout=5)
                    ids = [m.get("id") for m in json.loads(body).get("data", [])] if status == 200 else []
                    if self.model is None or self.model in ids:
                        return time.monotonic() - t0
                    last = f"/v1/models lists {ids}, not {self.model!r}"
                else:
                    last = f"/health returned HTTP {status}"
            except (OSError, ValueError) as e:  # refused / reset / timeout / bad JSON
                last = f"{type(e).__name__}: {e}"
            if time.monotonic() >= deadline:
                raise ServerError(f"server not ready after {timeout:g} s ({last}); last log line: "
                                  f"{self.failure_cause()} (logs: {self.stderr_log}, {self.stdout_log})")
            time.sleep(poll)

    def _group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def stop(self) -> Optional[int]:
        """SIGTERM the process group, SIGKILL it after ``stop_grace`` s; wait for it.

        Idempotent; returns the server's exit code (None if never started)."""
        if self.proc is None:
            return None
        pgid = self.proc.pid  # start_new_session: the leader's pid is the group id
        for sig, grace in ((signal.SIGTERM, self.stop_grace), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline:
                self.proc.poll()  # reap the leader so it does not linger as a zombie
                if self.proc.returncode is not None and not self._group_alive(pgid):
                    break
                time.sleep(0.1)
            else:
                continue  # something in the group survived: next signal
            break
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        return self.proc.returncode

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# ==========================================================================
# Prometheus spec-decode counters
# ==========================================================================
M_DRAFTS = "vllm:spec_decode_num_drafts"
M_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
M_ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
M_ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
_COUNTER_KEYS = {M_DRAFTS: "drafts", M_DRAFT_TOKENS: "draft_tokens", M_ACCEPTED: "accepted"}

_SAMPLE = re.compile(
    r'^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)'
    r'(?:\{(?P<labels>(?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?'
    r'\s+(?P<value>\S+)(?:\s+\S+)?\s*$')
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


def _samples(text: str) -> Iterable[tuple[str, dict[str, str], float]]:
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        yield m.group("name"), labels, value


def _base_name(name: str) -> str:
    # Counters are exposed as ``<name>_total``; ``<name>_created`` are timestamps.
    return name[:-len("_total")] if name.endswith("_total") else name


def parse_prometheus_spec_counters(text: str) -> dict[str, Any]:
    """Spec-decode counters out of a ``/metrics`` page, summed over label sets
    (engines, model names).

    Returns ``{"drafts", "draft_tokens", "accepted": int, "accepted_per_pos":
    list[int]}`` like ``runner.spec_counters``; absent counters are 0 / []."""
    out: dict[str, Any] = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "accepted_per_pos": []}
    per_pos: dict[int, float] = {}
    counts: dict[str, float] = {}
    for name, labels, value in _samples(text):
        if name.endswith("_created"):  # creation timestamps, not counts
            continue
        base = _base_name(name)
        if base in _COUNTER_KEYS:
            counts[_COUNTER_KEYS[base]] = counts.get(_COUNTER_KEYS[base], 0.0) + value
        elif base == M_ACCEPTED_PER_POS:
            try:
                pos = int(labels.get("position", ""))
            except ValueError:
                continue
            per_pos[pos] = per_pos.get(pos, 0.0) + value
    for key, v in counts.items():
        out[key] = int(round(v))
    if per_pos:
        out["accepted_per_pos"] = [int(round(per_pos.get(i, 0.0))) for i in range(max(per_pos) + 1)]
    return out


def fetch_spec_counters(base_url: str, timeout: float = 30.0) -> dict[str, Any]:
    """GET ``<base_url>/metrics`` and parse it (:func:`parse_prometheus_spec_counters`)."""
    status, body = _http_get(base_url.rstrip("/") + "/metrics", timeout=timeout)
    if status != 200:
        raise ServerError(f"GET /metrics returned HTTP {status}: {body[:200]}")
    return parse_prometheus_spec_counters(body)


def spec_counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """``after - before`` of two counter dicts (per-position lists padded with 0)."""
    from vllm_spec_plugins.bench.stats import counters_delta

    return counters_delta(before, after)


def _settled_counters(base_url: str, tries: int = 10, pause: float = 0.2) -> dict[str, Any]:
    """Counters read until two reads in a row agree (the last step's stats may
    reach the API server a moment after the last stream closed)."""
    prev = fetch_spec_counters(base_url)
    for _ in range(tries):
        time.sleep(pause)
        cur = fetch_spec_counters(base_url)
        if cur == prev:
            return cur
        prev = cur
    return prev


# ==========================================================================
# Load generator
# ==========================================================================
@dataclass
class RequestRecord:
    """One streamed chat completion. Times in seconds; ``start_s`` from the start
    of the run, ``chunk_times_s`` from the request's own start."""

    conversation: int
    turn: int
    start_s: float = 0.0
    ttft_s: Optional[float] = None           # first chunk with non-empty content
    latency_s: Optional[float] = None        # until the stream ended
    chunk_times_s: list[float] = field(default_factory=list)  # content-bearing chunks
    itl_s: list[float] = field(default_factory=list)          # gaps between them
    tpot_s: Optional[float] = None           # (latency - ttft) / (completion_tokens - 1)
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None  # from the final usage chunk
    finish_reason: Optional[str] = None
    text: str = ""
    error: Optional[str] = None              # None = success
    skipped: bool = False                    # not sent: an earlier turn failed

    @property
    def ok(self) -> bool:
        return self.error is None


def _percentile(values: Sequence[float], q: float) -> Optional[float]:
    """Linear-interpolated percentile, ``q`` in [0, 100]; None for no values."""
    vals = sorted(values)
    if not vals:
        return None
    pos = (len(vals) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(vals) - 1)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


def _ms_stats(prefix: str, seconds: Sequence[float]) -> dict[str, Optional[float]]:
    vals = [1000.0 * v for v in seconds if v is not None]
    return {f"{prefix}_mean_ms": (sum(vals) / len(vals)) if vals else None,
            f"{prefix}_median_ms": _percentile(vals, 50),
            f"{prefix}_p90_ms": _percentile(vals, 90)}


@dataclass
class LoadResult:
    """All requests of one :func:`run_load` call, in completion order."""

    requests: list[RequestRecord]
    wall_s: float
    concurrency: int
    max_tokens: int

    def summary(self) -> dict[str, Any]:
        """Counts, throughput and latency percentiles (ms) over the successful requests.

        ``itl_*`` pools the chunk gaps of all requests; with speculative decoding a
        chunk can carry several tokens (see the module docstring)."""
        ok = [r for r in self.requests if r.ok]
        out_tokens = sum(r.completion_tokens or 0 for r in ok)
        wall = self.wall_s
        s: dict[str, Any] = {
            "requests": len(self.requests),
            "completed": len(ok),
            "errors": sum(1 for r in self.requests if not r.ok and not r.skipped),
            "skipped": sum(1 for r in self.requests if r.skipped),
            "concurrency": self.concurrency,
            "wall_s": wall,
            "output_tokens": out_tokens,
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in ok),
            "output_tokens_per_s": out_tokens / wall if wall > 0 else None,
            "requests_per_s": len(ok) / wall if wall > 0 else None,
        }
        s.update(_ms_stats("ttft", [r.ttft_s for r in ok]))
        s.update(_ms_stats("tpot", [r.tpot_s for r in ok]))
        s.update(_ms_stats("itl", [g for r in ok for g in r.itl_s]))
        s.update(_ms_stats("latency", [r.latency_s for r in ok]))
        chunks = sum(len(r.chunk_times_s) for r in ok)
        s["tokens_per_chunk"] = out_tokens / chunks if chunks else None
        return s

    def texts(self) -> list[list[Optional[str]]]:
        """:func:`conversation_texts` of this result."""
        return conversation_texts(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def conversation_texts(result: LoadResult) -> list[list[Optional[str]]]:
    """Assistant texts as ``[conversation][turn]`` (None where a request failed or
    was skipped), for comparing greedy outputs of two methods."""
    n_conv = 1 + max((r.conversation for r in result.requests), default=-1)
    out: list[list[Optional[str]]] = [[] for _ in range(n_conv)]
    for r in sorted(result.requests, key=lambda r: (r.conversation, r.turn)):
        row = out[r.conversation]
        row.extend([None] * (r.turn + 1 - len(row)))
        row[r.turn] = r.text if r.ok else None
    return out


def _messages_for_turn(conversation: list[dict], followups: Sequence[str],
                       answers: Sequence[str], turn: int) -> list[dict]:
    msgs = [dict(m) for m in conversation]
    for t in range(turn):
        msgs.append({"role": "assistant", "content": answers[t]})
        msgs.append({"role": "user", "content": followups[t]})
    return msgs


def _sse_payloads(buffer: bytearray) -> list[str]:
    """Pop complete SSE events from ``buffer``; return their ``data`` payloads."""
    out = []
    while True:
        idx = buffer.find(b"\n\n")
        if idx < 0:
            return out
        event = bytes(buffer[:idx]).decode("utf-8", errors="replace")
        del buffer[:idx + 2]
        data = [ln[5:].lstrip(" ") if ln.startswith("data:") else None for ln in event.split("\n")]
        data = [d for d in data if d is not None]
        if data:
            out.append("\n".join(data))


async def _stream_one(session: Any, url: str, body: dict, rec: RequestRecord, t_run0: float,
                      timeout: float) -> None:
    """Send one streaming request and fill ``rec`` (never raises for request errors)."""
    import aiohttp

    t0 = time.perf_counter()
    rec.start_s = t0 - t_run0
    text_parts: list[str] = []
    done = False
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                detail = (await resp.text())[:500]
                rec.error = f"HTTP {resp.status}: {detail}"
                return
            buffer = bytearray()
            async for data in resp.content.iter_any():
                now = time.perf_counter() - t0
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
                        rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
                        rec.completion_tokens = usage.get("completion_tokens", rec.completion_tokens)
                    content = False
                    for choice in chunk.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            text_parts.append(piece)
                            content = True
                        if choice.get("finish_reason"):
                            rec.finish_reason = choice["finish_reason"]
                    if content:
                        if rec.ttft_s is None:
                            rec.ttft_s = now
                        rec.chunk_times_s.append(now)
            rec.latency_s = time.perf_counter() - t0
    except asyncio.CancelledError:
        raise
    except Exception as e:  # connection refused/reset, timeout, ...
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        rec.text = "".join(text_parts)
    if rec.error is None and not done:
        rec.error = "stream ended without [DONE]"
    if rec.error is None:
        times = rec.chunk_times_s
        rec.itl_s = [b - a for a, b in zip(times, times[1:])]
        if rec.completion_tokens is None:
            rec.error = "no usage in the stream (stream_options.include_usage ignored?)"
        elif rec.ttft_s is not None and rec.completion_tokens > 1:
            rec.tpot_s = (rec.latency_s - rec.ttft_s) / (rec.completion_tokens - 1)


def _check_inputs(conversations: Sequence[list[dict]], followups: Optional[Sequence[Sequence[str]]],
                  max_tokens: int, concurrency: int) -> list[list[str]]:
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not followups:
        return [[] for _ in conversations]
    if len(followups) != len(conversations):
        raise ValueError(f"followups must be parallel to conversations: {len(followups)} lists "
                         f"for {len(conversations)} conversations")
    return [list(f) for f in followups]


async def run_load_async(base_url: str, model: str, conversations: Sequence[list[dict]],
                         followups: Optional[Sequence[Sequence[str]]] = None, *, max_tokens: int,
                         concurrency: int, temperature: float = 0.0, timeout: float = 600,
                         ignore_eos: bool = False,
                         progress: Optional[Callable[[int, int], Any]] = None) -> LoadResult:
    """Async form of :func:`run_load` (for callers already inside an event loop)."""
    import aiohttp

    fups = _check_inputs(conversations, followups, max_tokens, concurrency)
    url = base_url.rstrip("/") + "/v1/chat/completions"
    total = sum(1 + len(f) for f in fups)
    answers: list[list[str]] = [[] for _ in conversations]
    records: list[RequestRecord] = []
    ready: deque[tuple[int, int]] = deque((i, 0) for i in range(len(conversations)))
    wake = asyncio.Condition()
    finished = 0

    async def account(n: int) -> None:
        nonlocal finished
        finished += n
        if progress is not None:
            progress(finished, total)
        async with wake:
            wake.notify_all()

    async def worker(session: Any) -> None:
        while True:
            async with wake:
                while not ready and finished < total:
                    await wake.wait()
                if not ready:
                    return
                conv, turn = ready.popleft()
            body = {"model": model,
                    "messages": _messages_for_turn(conversations[conv], fups[conv], answers[conv], turn),
                    "max_tokens": max_tokens, "temperature": temperature, "stream": True,
                    "stream_options": {"include_usage": True}, "ignore_eos": ignore_eos}
            rec = RequestRecord(conversation=conv, turn=turn)
            await _stream_one(session, url, body, rec, t_run0, timeout)
            records.append(rec)
            n_done = 1
            if rec.ok:
                answers[conv].append(rec.text)
                if turn < len(fups[conv]):
                    async with wake:
                        ready.append((conv, turn + 1))
                        wake.notify_all()
            else:  # the chain cannot go on without this answer
                for t in range(turn + 1, len(fups[conv]) + 1):
                    records.append(RequestRecord(conversation=conv, turn=t, skipped=True,
                                                 error=f"skipped: turn {turn} of this conversation failed"))
                    n_done += 1
            await account(n_done)

    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    t_run0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector) as session:
        n_workers = max(1, min(concurrency, total))
        await asyncio.gather(*(worker(session) for _ in range(n_workers)))
    wall = time.perf_counter() - t_run0
    return LoadResult(requests=records, wall_s=wall, concurrency=concurrency, max_tokens=max_tokens)


def run_load(base_url: str, model: str, conversations: Sequence[list[dict]],
             followups: Optional[Sequence[Sequence[str]]] = None, *, max_tokens: int,
             concurrency: int, temperature: float = 0.0, timeout: float = 600,
             ignore_eos: bool = False,
             progress: Optional[Callable[[int, int], Any]] = None) -> LoadResult:
    """Stream ``/v1/chat/completions`` requests with at most ``concurrency`` in flight.

    ``conversations[i]`` is the message list of conversation ``i``'s first request;
    ``followups[i]`` (optional, parallel) lists further user turns: turn ``t+1`` is
    queued when turn ``t`` finished, with the assistant's answer and the next user
    message appended (other conversations keep the free slots busy meanwhile). A
    failed request is recorded with its error and ends its chain (later turns are
    recorded as skipped); it never stops the run. ``timeout`` is per request;
    ``progress(done, total)`` is called after every finished request.
    """
    return asyncio.run(run_load_async(base_url, model, conversations, followups,
                                      max_tokens=max_tokens, concurrency=concurrency,
                                      temperature=temperature, timeout=timeout,
                                      ignore_eos=ignore_eos, progress=progress))


# ==========================================================================
# One method, online
# ==========================================================================
def _safe(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def run_method_online(engine_kwargs: dict, *, workloads: Sequence[Any], concurrencies: Sequence[int],
                      max_tokens: int, env: Optional[dict] = None, log_dir: str | Path,
                      startup_timeout: float = 900, warmup: bool = True, host: str = "127.0.0.1",
                      python: str = sys.executable, request_timeout: float = 600,
                      log_name: str = "server",
                      progress: Optional[Callable[[str, int, int, int], Any]] = None) -> dict[str, Any]:
    """Serve one method and measure it on every (workload, concurrency).

    ``workloads``: objects with ``.name``, ``.prompts`` (message lists) and
    optionally ``.followups`` (empty, or parallel to ``prompts``: further user
    turns). For each pair: spec counters are read before and after
    :func:`run_load`, and the summary, counter delta, texts per conversation and
    request records are kept. The server is always stopped, also on errors.
    ``progress(workload, concurrency, done, total)`` reports requests.

    Returns ``{"status": "ok"|"failed", "error", "startup_s", "base_url",
    "server_pid", "command", "stdout_log", "stderr_log",
    "results": {workload: {str(concurrency): {"summary", "spec", "texts",
    "requests"}}}}`` (JSON-serialisable; results done before a failure are kept).
    """
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    model = engine_kwargs.get("model")
    port = free_port(host)
    base_url = f"http://{host}:{port}"
    out: dict[str, Any] = {"status": "failed", "error": None, "startup_s": None,
                           "base_url": base_url, "server_pid": None,
                           "stdout_log": str(log_dir / f"{log_name}.stdout.log"),
                           "stderr_log": str(log_dir / f"{log_name}.stderr.log"),
                           "command": None, "results": {}}
    srv: Optional[ServerProcess] = None
    try:
        cmd = server_command(engine_kwargs, host=host, port=port, python=python)
        out["command"] = cmd
        srv = ServerProcess(cmd, base_url=base_url, model=model, env=env,
                            stdout_log=out["stdout_log"], stderr_log=out["stderr_log"])
        t0 = time.perf_counter()
        srv.start()
        out["server_pid"] = srv.pid
        srv.wait_ready(startup_timeout)
        out["startup_s"] = time.perf_counter() - t0
        if warmup:
            w = run_load(base_url, model, [WARMUP_MESSAGES], max_tokens=WARMUP_MAX_TOKENS,
                         concurrency=1, timeout=request_timeout)
            if not w.requests[0].ok:
                srv.check_alive("during the warm-up request")
                raise ServerError(f"warm-up request failed: {w.requests[0].error}")
        for wl in workloads:
            fups = list(getattr(wl, "followups", None) or [])
            per_c: dict[str, Any] = {}
            out["results"][wl.name] = per_c
            for c in concurrencies:
                before = fetch_spec_counters(base_url)
                cb = None
                if progress is not None:
                    cb = (lambda name, cc: lambda d, t: progress(name, cc, d, t))(wl.name, c)
                res = run_load(base_url, model, wl.prompts, fups or None, max_tokens=max_tokens,
                               concurrency=c, timeout=request_timeout, progress=cb)
                srv.check_alive(f"during workload {wl.name!r} at concurrency {c}")
                after = _settled_counters(base_url)
                per_c[str(c)] = {"summary": res.summary(),
                                 "spec": spec_counters_delta(before, after),
                                 "texts": res.texts(),
                                 "requests": [asdict(r) for r in res.requests]}
        out["status"] = "ok"
    except Exception as e:
        msg = f"{type(e).__name__}: {e}" if not isinstance(e, (ServerError, ValueError)) else str(e)
        if srv is not None and srv.proc is not None and not srv.alive() and not isinstance(e, ServerError):
            msg += f"; server exited: {srv.failure_cause()}"
        out["error"] = msg
    finally:
        if srv is not None:
            out["server_returncode"] = srv.stop()
    return out


def served_model(base_url: str, timeout: float = 10.0) -> str:
    """The first model id a running OpenAI-compatible server lists."""
    try:
        status, body = _http_get(base_url.rstrip("/") + "/v1/models", timeout=timeout)
    except OSError as e:
        raise ServerError(f"--server-url {base_url}: cannot connect ({e}); is the server running?") from None
    if status != 200:
        raise ServerError(f"--server-url {base_url}: GET /v1/models answered HTTP {status}")
    try:
        data = json.loads(body)["data"]
        return str(data[0]["id"])
    except (ValueError, KeyError, IndexError, TypeError):
        raise ServerError(f"--server-url {base_url}: /v1/models lists no model") from None


def _counters_or_none(base_url: str) -> Optional[dict[str, Any]]:
    try:
        return fetch_spec_counters(base_url)
    except (ServerError, OSError):
        return None


def measurement_from_load(cell: dict, res: LoadResult, spec: Optional[dict]) -> dict[str, Any]:
    """A benchmark measurement (see ``stats.py``) out of one load run."""
    s = res.summary()
    texts = [[t or "" for t in conv] for conv in res.texts()]
    return {"workload": cell["workload"], "scenario": cell["scenario"],
            "wall_s": res.wall_s, "num_prompts": len(cell["prompts"]),
            "output_tokens": s["output_tokens"], "texts": texts, "spec": spec, "drafter": None,
            "errors": s["errors"] + s["skipped"],
            "latency": {"ttft_ms_p50": s["ttft_median_ms"], "ttft_ms_p90": s["ttft_p90_ms"],
                        "tpot_ms_p50": s["tpot_median_ms"], "itl_ms_p50": s["itl_median_ms"],
                        "itl_ms_p90": s["itl_p90_ms"]},
            "summary": s}


def run_cells(*, label: str, repeat: int, cells: Sequence[dict], engine_kwargs: Optional[dict],
              server_url: Optional[str], max_tokens: int, env: Optional[dict], log_dir: str | Path,
              timeout: Optional[float] = None, startup_timeout: float = 900,
              on_cell_done: Optional[Callable[[int], Any]] = None) -> dict[str, Any]:
    """The benchmark's online run of one (repeat, method): serve the method (or use
    the user's ``server_url``), then load it with each cell's conversations at the
    cell's concurrency. Returns a run dict like the offline worker's
    (``{"status", "label", "repeat", "measurements", ...}``); a failure keeps the
    cells measured before it, and a cell with failed requests fails the run."""
    run: dict[str, Any] = {"label": label, "repeat": repeat, "status": "failed", "measurements": []}
    srv: Optional[ServerProcess] = None
    t_begin = time.perf_counter()
    try:
        if server_url:
            base_url = server_url.rstrip("/")
            model = served_model(base_url)
        else:
            assert engine_kwargs is not None
            log_dir = Path(log_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            stem = f"r{repeat}-{_safe(label)}-online"
            host = "127.0.0.1"
            port = free_port(host)
            base_url = f"http://{host}:{port}"
            model = engine_kwargs["model"]
            run["stderr_log"] = str(log_dir / f"{stem}.stderr.log")
            srv = ServerProcess(server_command(engine_kwargs, host=host, port=port),
                                base_url=base_url, model=model, env=env,
                                stdout_log=log_dir / f"{stem}.stdout.log",
                                stderr_log=run["stderr_log"])
            srv.start()
            run["startup_s"] = srv.wait_ready(startup_timeout)
        warm = run_load(base_url, model, [WARMUP_MESSAGES], max_tokens=WARMUP_MAX_TOKENS, concurrency=1)
        if not warm.requests[0].ok:
            raise ServerError(f"warm-up request failed: {warm.requests[0].error}")
        for cell in cells:
            left = None if timeout is None else timeout - (time.perf_counter() - t_begin)
            if left is not None and left <= 0:
                raise ServerError(f"run timed out after {timeout:g} s")
            # a server that is not vLLM may have no /metrics: then no acceptance numbers
            before = _counters_or_none(base_url)
            res = run_load(base_url, model, cell["prompts"], cell.get("followups") or None,
                           max_tokens=max_tokens, concurrency=int(cell["concurrency"]),
                           timeout=left if left is not None else 600)
            if srv is not None:
                srv.check_alive(f"during {cell['workload']} / {cell['scenario']}")
            spec = spec_counters_delta(before, _settled_counters(base_url)) if before else None
            m = measurement_from_load(cell, res, spec if spec and spec["draft_tokens"] else None)
            run["measurements"].append(m)
            if on_cell_done is not None:
                on_cell_done(1)
            if m["errors"]:
                first = next(r.error for r in res.requests if r.error)
                raise ServerError(f"{m['errors']} request(s) failed in {cell['workload']} / "
                                  f"{cell['scenario']}: {first}")
        run["status"] = "ok"
    except Exception as e:
        run["error"] = str(e) if isinstance(e, (ServerError, ValueError)) else f"{type(e).__name__}: {e}"
        if srv is not None and srv.proc is not None and not srv.alive() and not isinstance(e, ServerError):
            run["error"] += f"; server exited: {srv.failure_cause()}"
    finally:
        if srv is not None:
            run["server_returncode"] = srv.stop()
    return run
