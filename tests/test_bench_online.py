"""Online benchmark mode (vllm_spec_plugins.bench.online).

Unit tests use a fake OpenAI streaming server (aiohttp, in a thread or, for the
process-management tests, as a subprocess: this file run as a script). The one
real test (marked ``engine``) serves SmolLM2-135M with the suffix_tree plugin.

Run the fake server by hand: ``python tests/test_bench_online.py --port 8000``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web

from vllm_spec_plugins.bench.online import (
    LoadResult,
    RequestRecord,
    ServerError,
    ServerProcess,
    _percentile,
    conversation_texts,
    fetch_spec_counters,
    free_port,
    last_meaningful_line,
    parse_prometheus_spec_counters,
    run_load,
    run_method_online,
    server_command,
    spec_counters_delta,
)

HERE = Path(__file__).resolve()
MODEL_DIR = "/models/smol/hf"


# ==========================================================================
# server_command
# ==========================================================================
def _runner_style_kwargs(**extra):
    kw = dict(model=MODEL_DIR, dtype="bfloat16", kv_cache_memory_bytes=2 << 30,
              max_model_len=4096, disable_log_stats=False, seed=0,
              speculative_config={"method": "custom_class",
                                  "model": "vllm_spec_plugins.integration.PluginDrafter",
                                  "num_speculative_tokens": 8},
              additional_config={"spec_plugins": {"method": "suffix_tree"}})
    kw.update(extra)
    return kw


def _flag_value(cmd, flag):
    i = cmd.index(flag)
    return cmd[i + 1]


def test_server_command_translates_engine_kwargs():
    cmd = server_command(_runner_style_kwargs(), host="127.0.0.1", port=8123, python="/py")
    assert cmd[:3] == ["/py", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag_value(cmd, "--model") == MODEL_DIR
    assert _flag_value(cmd, "--dtype") == "bfloat16"
    assert _flag_value(cmd, "--kv-cache-memory-bytes") == str(2 << 30)
    assert _flag_value(cmd, "--max-model-len") == "4096"
    assert _flag_value(cmd, "--seed") == "0"
    assert json.loads(_flag_value(cmd, "--speculative-config")) == {
        "method": "custom_class", "model": "vllm_spec_plugins.integration.PluginDrafter",
        "num_speculative_tokens": 8}
    assert json.loads(_flag_value(cmd, "--additional-config")) == {
        "spec_plugins": {"method": "suffix_tree"}}
    assert _flag_value(cmd, "--host") == "127.0.0.1"
    assert _flag_value(cmd, "--port") == "8123"
    assert "--disable-uvicorn-access-log" in cmd
    assert "--disable-log-stats" not in cmd        # stats stay on: /metrics has the counters
    assert "--enforce-eager" not in cmd
    assert "--served-model-name" not in cmd


def test_server_command_booleans_none_and_served_name():
    kw = _runner_style_kwargs(disable_log_stats=True, enforce_eager=True, speculative_config=None,
                              additional_config=None)
    cmd = server_command(kw, host="0.0.0.0", port=1, served_model_name="smol")
    assert cmd[0] == sys.executable
    assert "--disable-log-stats" in cmd and "--enforce-eager" in cmd
    assert "--speculative-config" not in cmd and "--additional-config" not in cmd
    assert _flag_value(cmd, "--served-model-name") == "smol"
    assert server_command({"model": "m"}, host="h", port=2)[3:] == [
        "--model", "m", "--host", "h", "--port", "2", "--disable-uvicorn-access-log"]


def test_server_command_errors_name_the_key():
    with pytest.raises(ValueError, match="'gpu_memory_utilization'"):
        server_command(_runner_style_kwargs(gpu_memory_utilization=0.5), host="h", port=1)
    with pytest.raises(ValueError, match="'model' is required"):
        server_command({"dtype": "float32"}, host="h", port=1)
    with pytest.raises(ValueError, match="'enforce_eager' must be a bool"):
        server_command({"model": "m", "enforce_eager": "yes"}, host="h", port=1)
    with pytest.raises(ValueError, match="'speculative_config' must be a dict"):
        server_command({"model": "m", "speculative_config": "{}"}, host="h", port=1)


def test_free_port_is_bindable():
    port = free_port()
    assert isinstance(port, int) and 1024 <= port <= 65535  # an unprivileged TCP port
    # Free: free_port released it, so a server can bind it, listen and be reached there.
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen(1)
        assert s.getsockname() == ("127.0.0.1", port)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            assert c.getpeername() == ("127.0.0.1", port)
        # ... and while it is held, the port really is that one: a second bind fails.
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))


# ==========================================================================
# Prometheus parsing
# ==========================================================================
# Captured from /metrics of vLLM 0.32.0 (CPU) serving SmolLM2-135M with the
# suffix_tree plugin (k=8) after one request; a few non-spec lines kept around it.
REAL_METRICS = """\
# HELP process_open_fds Number of open file descriptors.
# TYPE process_open_fds gauge
process_open_fds 34.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 4.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 1.7955954773670313e+09
# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 8.0
# HELP vllm:spec_decode_num_draft_tokens_created Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_created gauge
vllm:spec_decode_num_draft_tokens_created{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 1.795595477367058e+09
# HELP vllm:spec_decode_num_accepted_tokens_total Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 8.0
# HELP vllm:spec_decode_num_accepted_tokens_created Number of accepted tokens.
# TYPE vllm:spec_decode_num_accepted_tokens_created gauge
vllm:spec_decode_num_accepted_tokens_created{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf"} 1.7955954773670738e+09
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="0"} 4.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="1"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="2"} 2.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="3"} 0.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="4"} 0.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="5"} 0.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="6"} 0.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="7"} 0.0
# HELP vllm:spec_decode_num_accepted_tokens_per_pos_created Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_created gauge
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="0"} 1.7955954773671014e+09
vllm:spec_decode_num_accepted_tokens_per_pos_created{engine="0",model_name="/root/.cache/vllm-spec-plugins/models/smollm2-135m/hf",position="1"} 1.7955954773671079e+09
"""


def test_parse_real_metrics_excerpt():
    c = parse_prometheus_spec_counters(REAL_METRICS)
    assert c == {"drafts": 4, "draft_tokens": 8, "accepted": 8,
                 "accepted_per_pos": [4, 2, 2, 0, 0, 0, 0, 0]}


def test_parse_sums_label_sets_and_handles_odd_labels():
    # A second engine, out-of-order positions, a label value with '}' and ',' in it.
    extra = "\n".join([
        'vllm:spec_decode_num_drafts_total{engine="1",model_name="m,{x}"} 6.0',
        'vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="m,{x}"} 10',
        'vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="m,{x}"} 5.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{position="9",engine="1",model_name="m,{x}"} 1.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="m,{x}",position="0"} 4.0',
        'vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1"} 7.0',  # no position: ignored
        "garbage line without value",
    ])
    c = parse_prometheus_spec_counters(REAL_METRICS + extra + "\n")
    assert c["drafts"] == 10 and c["draft_tokens"] == 18 and c["accepted"] == 13
    assert c["accepted_per_pos"] == [8, 2, 2, 0, 0, 0, 0, 0, 0, 1]


def test_parse_no_speculation_gives_zeros():
    text = "# HELP x\nprocess_open_fds 34.0\nvllm:num_requests_running{engine=\"0\"} 0.0\n"
    assert parse_prometheus_spec_counters(text) == {"drafts": 0, "draft_tokens": 0, "accepted": 0,
                                                    "accepted_per_pos": []}
    assert parse_prometheus_spec_counters("") == parse_prometheus_spec_counters(text)


def test_counters_delta_pads_positions():
    a = {"drafts": 1, "draft_tokens": 2, "accepted": 1, "accepted_per_pos": []}
    b = {"drafts": 4, "draft_tokens": 9, "accepted": 5, "accepted_per_pos": [3, 2]}
    assert spec_counters_delta(a, b) == {"drafts": 3, "draft_tokens": 7, "accepted": 4,
                                         "accepted_per_pos": [3, 2]}


def test_last_meaningful_line():
    lines = [
        "/x/api_server.py:24: DeprecationWarning: deprecated",
        "  warnings.warn(",
        "Traceback (most recent call last):",
        '  File "/x/entry.py", line 83, in build',
        "ValueError: vllm-spec-plugins: invalid settings for method 'suffix_tree':",
        "  additional_config.spec_plugins.min_token_probb: unknown setting for method 'suffix_tree'",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:02<00:00,  2.48s/it]",
    ]
    assert last_meaningful_line(lines) == (
        "ValueError: vllm-spec-plugins: invalid settings for method 'suffix_tree': "
        "additional_config.spec_plugins.min_token_probb: unknown setting for method 'suffix_tree'")
    assert last_meaningful_line(["starting", "/a.py:1: UserWarning: x", ""]) == "starting"
    assert last_meaningful_line([]) == ""


def test_percentile():
    assert _percentile([], 50) is None
    assert _percentile([3.0], 90) == 3.0
    assert _percentile([4, 1, 3, 2], 50) == pytest.approx(2.5)
    assert _percentile(list(range(11)), 90) == pytest.approx(9.0)


# ==========================================================================
# A fake OpenAI streaming server
# ==========================================================================
class FakeOpenAI:
    """Streams ``n_chunks`` content chunks per chat completion: a role chunk at
    once (empty content, like vLLM), the first content after ``ttft`` s, then one
    every ``gap`` s; each chunk counts as ``tokens_per_chunk`` tokens. A last user
    message containing FAIL gets HTTP 500. Counts requests in flight, keeps the
    request bodies, and serves spec counters on /metrics (one draft of 3 tokens,
    2 accepted, per chunk after the first)."""

    def __init__(self, model="fake", ttft=0.15, gap=0.05, n_chunks=4, tokens_per_chunk=2):
        self.model, self.ttft, self.gap = model, ttft, gap
        self.n_chunks, self.tokens_per_chunk = n_chunks, tokens_per_chunk
        self.inflight = self.max_inflight = 0
        self.bodies: list[dict] = []
        self.steps = 0

    @staticmethod
    def answer_pieces(last_user: str, n: int) -> list[str]:
        return [f"ans({last_user})"] + [f" p{i}" for i in range(1, n)]

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def health(self, request):
        return web.Response(text="")

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def metrics(self, request):
        lab = f'engine="0",model_name="{self.model}"'
        lines = [f"vllm:spec_decode_num_drafts_total{{{lab}}} {float(self.steps)}",
                 f"vllm:spec_decode_num_draft_tokens_total{{{lab}}} {3.0 * self.steps}",
                 f"vllm:spec_decode_num_accepted_tokens_total{{{lab}}} {2.0 * self.steps}"]
        lines += [f'vllm:spec_decode_num_accepted_tokens_per_pos_total{{{lab},position="{i}"}} '
                  f"{float(self.steps if i < 2 else 0)}" for i in range(3)]
        return web.Response(text="\n".join(lines) + "\n")

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            assert body["model"] == self.model and body["stream"] is True
            last = body["messages"][-1]["content"]
            if "FAIL" in last:
                await asyncio.sleep(0.02)
                return web.json_response({"error": {"message": "boom"}}, status=500)
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)

            async def send(obj):
                await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

            base = {"id": "c1", "object": "chat.completion.chunk", "model": self.model}
            await send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            await asyncio.sleep(self.ttft)
            pieces = self.answer_pieces(last, self.n_chunks)
            for i, piece in enumerate(pieces):
                if i:
                    await asyncio.sleep(self.gap)
                    self.steps += 1
                fin = "length" if i == len(pieces) - 1 else None
                await send({**base, "choices": [{"index": 0, "delta": {"content": piece},
                                                 "finish_reason": fin}]})
            n_tok = self.n_chunks * self.tokens_per_chunk
            await send({**base, "choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": n_tok,
                                                         "total_tokens": 11 + n_tok}})
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            # Before aiohttp finishes the response: the client cannot start its next
            # request before this runs, so max_inflight never over-counts.
            self.inflight -= 1


class ThreadServer:
    """Runs an aiohttp app on its own event loop in a daemon thread."""

    def __init__(self, app: web.Application):
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.thread.start()

        async def setup():
            self.runner = web.AppRunner(self.app)
            await self.runner.setup()
            site = web.TCPSite(self.runner, "127.0.0.1", 0)
            await site.start()
            return self.runner.addresses[0][1]

        self.port = asyncio.run_coroutine_threadsafe(setup(), self.loop).result(10)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def _convs(n, fail=()):
    return [[{"role": "system", "content": "be brief"},
             {"role": "user", "content": ("FAIL " if i in fail else "") + f"q{i}"}] for i in range(n)]


# ==========================================================================
# run_load against the fake server
# ==========================================================================
def test_run_load_measures_ttft_itl_tpot():
    fake = FakeOpenAI(ttft=0.15, gap=0.05, n_chunks=4, tokens_per_chunk=2)
    with ThreadServer(fake.app()) as srv:
        res = run_load(srv.url, "fake", _convs(2), max_tokens=8, concurrency=2)
    assert [r.error for r in res.requests] == [None, None]
    for r in res.requests:
        assert 0.14 <= r.ttft_s < 0.15 + 0.25, r.ttft_s          # role chunk does not count
        assert len(r.chunk_times_s) == 4 and r.chunk_times_s[0] == r.ttft_s
        assert len(r.itl_s) == 3
        assert all(0.045 <= g < 0.05 + 0.15 for g in r.itl_s), r.itl_s
        assert r.completion_tokens == 8 and r.prompt_tokens == 11
        assert r.finish_reason == "length"
        assert r.latency_s >= r.chunk_times_s[-1]
        assert r.tpot_s == pytest.approx((r.latency_s - r.ttft_s) / 7)
        assert r.text == f"ans(q{r.conversation}) p1 p2 p3"
    s = res.summary()
    assert s["requests"] == 2 and s["completed"] == 2 and s["errors"] == 0
    assert s["output_tokens"] == 16
    assert s["output_tokens_per_s"] == pytest.approx(16 / res.wall_s)
    assert s["requests_per_s"] == pytest.approx(2 / res.wall_s)
    assert 140 <= s["ttft_median_ms"] < 400 and 140 <= s["ttft_p90_ms"] < 400
    assert 45 <= s["itl_median_ms"] < 200 and s["itl_p90_ms"] >= s["itl_median_ms"]
    assert s["tpot_median_ms"] is not None and s["tokens_per_chunk"] == pytest.approx(2.0)
    # Concurrency 2, two requests: both ran at once.
    assert res.wall_s < 2 * (0.15 + 3 * 0.05)
    json.dumps(asdict(res))
    json.dumps(s)


def test_run_load_respects_concurrency_and_chains_followups():
    fake = FakeOpenAI(ttft=0.06, gap=0.02, n_chunks=3)
    convs = _convs(5)
    followups = [[f"more{i}a", f"more{i}b"] for i in range(5)]
    seen = []
    with ThreadServer(fake.app()) as srv:
        res = run_load(srv.url, "fake", convs, followups, max_tokens=16, concurrency=3,
                       progress=lambda d, t: seen.append((d, t)))
    assert fake.max_inflight == 3
    assert len(fake.bodies) == 15 and len(res.requests) == 15
    assert all(r.ok for r in res.requests)
    assert seen == [(i, 15) for i in range(1, 16)]
    for b in fake.bodies:
        assert b["max_tokens"] == 16 and b["temperature"] == 0.0 and b["ignore_eos"] is False
        assert b["stream_options"] == {"include_usage": True}
    # Turn t+1 carries the assistant's turn-t text and the next user turn.
    by_key = {(r.conversation, r.turn): r for r in res.requests}
    for b in fake.bodies:
        msgs = b["messages"]
        conv = int(msgs[1]["content"][1:])
        turn = (len(msgs) - 2) // 2
        assert msgs[:2] == convs[conv]
        for t in range(turn):
            assert msgs[2 + 2 * t] == {"role": "assistant", "content": by_key[(conv, t)].text}
            assert msgs[3 + 2 * t] == {"role": "user", "content": followups[conv][t]}
    for (conv, turn), r in by_key.items():
        if turn:
            prev = by_key[(conv, turn - 1)]
            assert r.start_s >= prev.start_s + prev.latency_s - 1e-6
    texts = conversation_texts(res)
    assert texts == res.texts()
    assert texts[2] == ["ans(q2) p1 p2", "ans(more2a) p1 p2", "ans(more2b) p1 p2"]


def test_run_load_records_errors_without_crashing():
    fake = FakeOpenAI(ttft=0.02, gap=0.01, n_chunks=2)
    with ThreadServer(fake.app()) as srv:
        res = run_load(srv.url, "fake", _convs(3, fail={1}), [["f0"], ["f1"], ["f2"]],
                       max_tokens=4, concurrency=2)
    assert len(res.requests) == 6
    failed = [r for r in res.requests if r.conversation == 1]
    assert {(r.turn, r.skipped) for r in failed} == {(0, False), (1, True)}
    first = next(r for r in failed if r.turn == 0)
    assert first.error.startswith("HTTP 500") and "boom" in first.error
    assert len(fake.bodies) == 5  # the failed chain's turn 1 was never sent
    s = res.summary()
    assert (s["requests"], s["completed"], s["errors"], s["skipped"]) == (6, 4, 1, 1)
    assert s["output_tokens"] == 4 * 4
    assert conversation_texts(res)[1] == [None, None]
    assert conversation_texts(res)[0] == ["ans(q0) p1", "ans(f0) p1"]


def test_run_load_connection_refused_is_recorded():
    res = run_load(f"http://127.0.0.1:{free_port()}", "m", _convs(2), max_tokens=4, concurrency=4)
    assert len(res.requests) == 2 and all(r.error for r in res.requests)
    s = res.summary()
    assert s["errors"] == 2 and s["output_tokens"] == 0 and s["ttft_median_ms"] is None


def test_run_load_input_checks():
    with pytest.raises(ValueError, match="parallel"):
        run_load("http://x", "m", _convs(2), [["a"]], max_tokens=4, concurrency=1)
    with pytest.raises(ValueError, match="concurrency"):
        run_load("http://x", "m", _convs(2), max_tokens=4, concurrency=0)


def test_summary_empty_result():
    s = LoadResult(requests=[], wall_s=0.0, concurrency=1, max_tokens=4).summary()
    assert s["requests"] == 0 and s["output_tokens_per_s"] is None and s["itl_p90_ms"] is None
    r = RequestRecord(conversation=0, turn=0)
    assert r.ok


# ==========================================================================
# Process management with a fake server process (this file run as a script)
# ==========================================================================
def _fake_python(tmp_path: Path) -> str:
    """An executable standing in for ``python``: ``<it> -m vllm... --port N ...``
    runs this file's fake server instead."""
    exe = tmp_path / "fakepython"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {HERE} \"$@\"\n")
    exe.chmod(0o755)
    return str(exe)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _port_closed(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_server_process_stops_whole_group_even_if_term_is_ignored(tmp_path):
    port = free_port()
    cmd = [sys.executable, str(HERE), "--port", str(port), "--model", "fake", "--stubborn"]
    srv = ServerProcess(cmd, base_url=f"http://127.0.0.1:{port}", model="fake",
                        env={"FAKE_MARK": "1"}, stdout_log=tmp_path / "o.log",
                        stderr_log=tmp_path / "e.log", stop_grace=1.0)
    with srv:
        assert srv.wait_ready(30) < 30
        assert srv.alive()
        assert fetch_spec_counters(srv.base_url)["drafts"] == 0
        pgid = srv.pid
    # aiohttp's run_app exits on SIGTERM, the child ignores it: SIGKILL after the grace.
    assert not srv.alive()
    assert _group_gone(pgid)
    assert _port_closed(port)
    log = (tmp_path / "o.log").read_text()
    assert "FAKE_MARK=1" in log and "child started" in log
    srv.stop()  # idempotent


def test_server_process_fails_fast_with_the_error_line(tmp_path):
    port = free_port()
    cmd = [sys.executable, str(HERE), "--port", str(port), "--fail-startup"]
    srv = ServerProcess(cmd, base_url=f"http://127.0.0.1:{port}", stdout_log=tmp_path / "o.log",
                        stderr_log=tmp_path / "e.log")
    t0 = time.monotonic()
    with srv, pytest.raises(ServerError) as ei:
        srv.wait_ready(60)
    assert time.monotonic() - t0 < 20
    msg = str(ei.value)
    assert "exited with code 1 before it was ready" in msg
    assert "ValueError: bad setting 'x': field: must be > 0" in msg


def test_server_process_wrong_model_times_out(tmp_path):
    port = free_port()
    cmd = [sys.executable, str(HERE), "--port", str(port), "--model", "other"]
    srv = ServerProcess(cmd, base_url=f"http://127.0.0.1:{port}", model="fake",
                        stdout_log=tmp_path / "o.log", stderr_log=tmp_path / "e.log")
    with srv, pytest.raises(ServerError, match=r"not ready after 3 s \(/v1/models lists \['other'\]"):
        srv.wait_ready(3)
    assert _group_gone(srv.pid)


class _WL(SimpleNamespace):
    pass


def test_run_method_online_with_fake_server(tmp_path):
    wls = [_WL(name="single", prompts=_convs(3), followups=[]),
           _WL(name="multi", prompts=_convs(2), followups=[["again0"], ["again1"]])]
    calls = []
    out = run_method_online({"model": "fake", "dtype": "float32"}, workloads=wls,
                            concurrencies=[1, 2], max_tokens=8, env={"FAKE_MARK": "1"},
                            log_dir=tmp_path, startup_timeout=30, python=_fake_python(tmp_path),
                            progress=lambda *a: calls.append(a))
    assert out["status"] == "ok", out["error"]
    assert out["startup_s"] > 0 and "--dtype" in out["command"]
    json.dumps(out)
    assert set(out["results"]) == {"single", "multi"}
    for name, n_req in (("single", 3), ("multi", 4)):
        for c in ("1", "2"):
            r = out["results"][name][c]
            assert r["summary"]["requests"] == n_req and r["summary"]["errors"] == 0
            assert r["summary"]["concurrency"] == int(c)
            # the fake counts one draft per chunk after the first: 3 per request
            assert r["spec"] == {"drafts": 3 * n_req, "draft_tokens": 9 * n_req,
                                 "accepted": 6 * n_req, "accepted_per_pos": [3 * n_req] * 2 + [0]}
            assert len(r["requests"]) == n_req
    assert out["results"]["multi"]["2"]["texts"] == [["ans(q0) p1 p2 p3", "ans(again0) p1 p2 p3"],
                                                     ["ans(q1) p1 p2 p3", "ans(again1) p1 p2 p3"]]
    assert ("multi", 2, 4, 4) in calls
    assert _group_gone(out["server_pid"])
    assert _port_closed(int(out["base_url"].rsplit(":", 1)[1]))


def test_run_method_online_startup_failure(tmp_path):
    # --fail-startup is not an engine kwarg; a bad kwarg fails before anything starts.
    out = run_method_online({"model": "fake", "bogus": 1}, workloads=[], concurrencies=[1],
                            max_tokens=4, log_dir=tmp_path, python=_fake_python(tmp_path))
    assert out["status"] == "failed" and "'bogus'" in out["error"] and out["server_pid"] is None
    out = run_method_online({"model": "FAIL"}, workloads=[], concurrencies=[1], max_tokens=4,
                            log_dir=tmp_path, python=_fake_python(tmp_path), startup_timeout=30)
    assert out["status"] == "failed"
    assert "ValueError: bad setting 'x': field: must be > 0" in out["error"]
    assert _group_gone(out["server_pid"])


# ==========================================================================
# The real server (vLLM CPU engine, SmolLM2-135M, suffix_tree plugin)
# ==========================================================================
REAL_PROMPTS = [
    "Repeat this line exactly three times: the quick brown fox jumps over the lazy dog.",
    "Write the numbers from 1 to 12 separated by commas.",
    "Copy this JSON exactly: {\"name\": \"ada\", \"id\": 7, \"tags\": [\"a\", \"b\"]}",
]


@pytest.fixture(scope="module")
def real_online(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed")
    from engine_utils import model_path

    from vllm_spec_plugins.integration import CONFIG_KEY, speculative_config

    kw = dict(model=model_path(), dtype="float32", kv_cache_memory_bytes=1 << 30,
              max_model_len=2048, disable_log_stats=False, seed=0, enforce_eager=True,
              speculative_config=speculative_config(8),
              additional_config={CONFIG_KEY: {"method": "suffix_tree"}})
    wl = _WL(name="repeat", prompts=[[{"role": "user", "content": p}] for p in REAL_PROMPTS],
             followups=[["Now say it once more."]] * len(REAL_PROMPTS))
    t0 = time.monotonic()
    out = run_method_online(kw, workloads=[wl], concurrencies=[2], max_tokens=32,
                            env={"VLLM_PLUGINS": "vllm_spec_plugins", "HF_HUB_OFFLINE": "1"},
                            log_dir=tmp_path_factory.mktemp("online"), startup_timeout=300)
    out["_elapsed"] = time.monotonic() - t0
    return out


@pytest.mark.engine
def test_real_server_online_run(real_online):
    out = real_online
    assert out["status"] == "ok", (out["error"], out["stderr_log"])
    r = out["results"]["repeat"]["2"]
    s = r["summary"]
    assert s["requests"] == 6 and s["completed"] == 6 and s["errors"] == 0
    assert s["output_tokens"] > 0 and s["ttft_median_ms"] > 0 and s["tpot_median_ms"] > 0
    assert all(t and t[0] and t[1] for t in r["texts"]), r["texts"]
    assert r["spec"]["drafts"] > 0 and r["spec"]["accepted"] > 0, r["spec"]
    assert len(r["spec"]["accepted_per_pos"]) == 8
    assert sum(r["spec"]["accepted_per_pos"]) == r["spec"]["accepted"]
    # Chains: every turn-1 request started after its turn 0 finished.
    recs = {(q["conversation"], q["turn"]): q for q in r["requests"]}
    for conv in range(3):
        t0, t1 = recs[(conv, 0)], recs[(conv, 1)]
        assert t1["start_s"] >= t0["start_s"] + t0["latency_s"] - 1e-6


@pytest.mark.engine
def test_real_server_is_gone_afterwards(real_online):
    assert real_online["server_pid"] is not None
    assert _group_gone(real_online["server_pid"])
    assert _port_closed(int(real_online["base_url"].rsplit(":", 1)[1]))


# ==========================================================================
# Fake server process (used by the process-management tests above)
# ==========================================================================
def _fake_server_main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("-m", dest="module", default=None)  # "python -m vllm..." stand-in
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--model", default="fake")
    p.add_argument("--fail-startup", action="store_true")
    p.add_argument("--stubborn", action="store_true",
                   help="ignore SIGTERM and start a child that ignores it too")
    a, _unknown = p.parse_known_args(argv)
    print(f"fake server: FAKE_MARK={os.environ.get('FAKE_MARK')}", flush=True)
    if a.fail_startup or a.model == "FAIL":
        time.sleep(0.3)
        print("/x.py:1: DeprecationWarning: old", file=sys.stderr, flush=True)
        raise ValueError("bad setting 'x':\n  field: must be > 0")
    if a.stubborn:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c",
                          "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                          "time.sleep(600)"])
        print("child started", flush=True)
    web.run_app(FakeOpenAI(model=a.model, ttft=0.02, gap=0.01).app(), host=a.host, port=a.port,
                print=None, access_log=None)
    return 0


if __name__ == "__main__":
    sys.exit(_fake_server_main())
