"""The memory soak (vllm_spec_plugins.bench.soak), without an engine.

Arguments, the request schedule, streaming with aborts against a fake
OpenAI server (aiohttp in a thread), process-tree RSS on real processes, the
slope / verdict computation on synthetic samples and the report writer.
No engine test: a real soak, even a tiny one, takes well over 90 s here
(server start-up alone is 45-270 s on 2 cores); it is smoke-run by hand.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time

import pytest
from aiohttp import web

from vllm_spec_plugins.bench import soak
from vllm_spec_plugins.bench.soak import (
    PlannedRequest,
    build_schedule,
    compare_with_baseline,
    compute_verdicts,
    config_from_args,
    growth_verdict,
    parse_range,
    process_role,
    process_tree_memory,
    prompt_messages,
    render_markdown,
    slope_per_1000,
    stream_request,
    write_report,
)
from vllm_spec_plugins.cli import build_parser

REGISTRY = {"suffix_tree": True, "token_recycling": True, "suffix_recycling": True}


def _args(*argv: str):
    return build_parser().parse_args(["soak", *argv])


def _config(*argv: str):
    return config_from_args(_args(*argv), registry=REGISTRY, has_arctic=False)


# ==========================================================================
# Arguments
# ==========================================================================
def test_defaults_are_valid_and_as_documented():
    cfg = _config()
    assert [m.label for m in cfg.methods] == ["none", "suffix_tree"]
    assert (cfg.requests, cfg.concurrency, cfg.sample_every) == (2000, 8, 100)
    assert cfg.abort_fraction == 0.25 and cfg.max_tokens == (16, 256)
    assert cfg.level_slope == 20.0 and cfg.level_fraction == 0.25
    assert cfg.probe and cfg.dtype == "float32" and cfg.notes == []


def test_cli_subcommand_and_module_entry_point():
    args = _args("--requests", "60", "--sample-every", "20")
    assert args.func.__name__ == "_cmd_soak"
    assert (args.requests, args.sample_every) == (60, 20)


@pytest.mark.parametrize("argv, flag, fix", [
    (["--requests", "0"], "--requests", "> 0"),
    (["--concurrency", "0"], "--concurrency", "> 0"),
    (["--sample-every", "0"], "--sample-every", "> 0"),
    (["--requests", "100", "--sample-every", "60"], "--sample-every", "--sample-every 50 or less"),
    (["--abort-fraction", "1.5"], "--abort-fraction", "between 0 and 1"),
    (["--long-fraction", "-0.1"], "--long-fraction", "between 0 and 1"),
    (["--max-tokens", "abc"], "--max-tokens", "LO:HI"),
    (["--max-tokens", "256:16"], "--max-tokens", "LO <= HI"),
    (["--long-prompt-tokens", "1:2:3"], "--long-prompt-tokens", "LO:HI"),
    (["--long-prompt-tokens", "300:3500"], "--long-prompt-tokens", "lower one of them"),
    (["--level-fraction", "1"], "--level-fraction", "between 0 and 1"),
    (["--level-slope", "0"], "--level-slope", "> 0"),
    (["--k", "500"], "--k", "at most 128"),
    (["--dtype", "fp8"], "--dtype", "float32"),
    (["--methods", "nonsense"], "--methods", "unknown method"),
    (["--server-env", "NOEQUALS"], "--server-env", "KEY=VALUE"),
    (["--plugin-config", "{bad"], "--plugin-config", "invalid JSON"),
])
def test_bad_arguments_name_the_flag_and_the_fix(argv, flag, fix):
    with pytest.raises(ValueError) as e:
        _config(*argv)
    assert flag in str(e.value) and fix in str(e.value)


def test_module_main_reports_bad_input_in_one_line(capsys):
    assert soak.main(["--requests", "10", "--sample-every", "8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("soak: error: --sample-every 8") and err.count("\n") == 1


def test_missing_baseline_is_noted():
    cfg = _config("--methods", "suffix_tree")
    assert any("'none' is not in --methods" in n for n in cfg.notes)


def test_parse_range_and_server_env():
    assert parse_range("16:256", "--x") == (16, 256)
    assert parse_range("32", "--x") == (32, 32)
    cfg = _config("--server-env", "MALLOC_ARENA_MAX=2", "--server-env", "A=b=c")
    assert cfg.server_env == {"MALLOC_ARENA_MAX": "2", "A": "b=c"}


# ==========================================================================
# Schedule
# ==========================================================================
def _plan(n=1000, seed=0, **kw):
    opts = dict(abort_fraction=0.25, long_fraction=0.3, long_prompt_tokens=(300, 3000),
                max_tokens=(16, 256))
    opts.update(kw)
    return build_schedule(n, seed=seed, **opts)


def test_schedule_is_deterministic_per_seed():
    assert _plan(seed=3) == _plan(seed=3)
    assert _plan(seed=3) != _plan(seed=4)
    a, b = _plan(seed=3), _plan(seed=3)
    assert [prompt_messages(r) for r in a[:50]] == [prompt_messages(r) for r in b[:50]]


def test_schedule_mixes_lengths_and_aborts_as_configured():
    plan = _plan(1000, abort_fraction=0.25, long_fraction=0.3)
    assert [r.index for r in plan] == list(range(1000))
    longs = [r for r in plan if r.kind == "long"]
    aborted = [r for r in plan if r.abort_after_chunks is not None]
    assert len(longs) == 300 and len(aborted) == 250  # exact shares, not "about"
    assert all(300 <= r.prompt_tokens <= 3000 for r in longs)
    assert all(r.prompt_tokens == 0 for r in plan if r.kind == "short")
    # lengths spread over the whole ranges, not clustered
    assert min(r.prompt_tokens for r in longs) < 500 and max(r.prompt_tokens for r in longs) > 2800
    outs = [r.max_tokens for r in plan]
    assert min(outs) >= 16 and max(outs) <= 256 and min(outs) < 30 and max(outs) > 240
    assert all(0 <= r.abort_after_chunks <= r.max_tokens // 4 for r in aborted)
    assert any(r.abort_after_chunks == 0 for r in aborted)  # some abort during prefill
    # long prompts and aborts are drawn independently: both kinds get aborted
    assert {r.kind for r in aborted} == {"short", "long"}
    sampled = sum(r.temperature > 0 for r in plan)
    assert 400 < sampled < 600


@pytest.mark.parametrize("abort, long", [(0.0, 0.0), (1.0, 1.0)])
def test_schedule_extreme_shares(abort, long):
    plan = _plan(40, abort_fraction=abort, long_fraction=long)
    assert sum(r.abort_after_chunks is not None for r in plan) == round(40 * abort)
    assert sum(r.kind == "long" for r in plan) == round(40 * long)


def test_prompt_lengths_follow_the_plan():
    def words(req):
        return len(prompt_messages(req)[0]["content"].split())

    short = PlannedRequest(0, "short", 0, 11, 32, 0.0, None)
    small = PlannedRequest(1, "long", 300, 12, 32, 0.0, None)
    big = PlannedRequest(2, "long", 3000, 12, 32, 0.0, None)
    assert words(short) < 40
    assert 8 * words(small) < words(big)
    assert prompt_messages(big)[0]["role"] == "user"


def test_request_body_streams_runs_to_max_tokens_and_sends_no_seed():
    req = PlannedRequest(5, "short", 0, 1, 77, 0.8, None)
    body = soak.request_body("m", req)
    assert body["stream"] and body["ignore_eos"] and body["max_tokens"] == 77
    assert body["stream_options"] == {"include_usage": True}
    assert "seed" not in body  # a seeded request kills vLLM 0.32's CPU engine (see request_body)


# ==========================================================================
# Streaming with aborts, against a fake OpenAI server
# ==========================================================================
class FakeStreamServer:
    """Streams ``chunks`` content chunks per chat request, ``gap`` s apart; records
    whether each request was read to the end or the client went away."""

    def __init__(self, chunks: int = 20, gap: float = 0.01) -> None:
        self.chunks, self.gap = chunks, gap
        self.finished = 0
        self.disconnected = 0
        self.in_flight = 0
        self.max_in_flight = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.json()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        try:
            await resp.prepare(request)
            role = {"choices": [{"delta": {"role": "assistant", "content": ""}}]}
            await resp.write(f"data: {json.dumps(role)}\n\n".encode())
            for i in range(self.chunks):
                await asyncio.sleep(self.gap)
                chunk = {"choices": [{"delta": {"content": f"t{i} "}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            usage = {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": self.chunks}}
            await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
            self.finished += 1
        except ConnectionResetError:  # the client closed the stream
            self.disconnected += 1
        except asyncio.CancelledError:
            self.disconnected += 1
            raise
        finally:
            self.in_flight -= 1
        return resp


@pytest.fixture
def fake_server():
    fake = FakeStreamServer()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", fake.chat)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(app)

    async def setup():
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return site._server.sockets[0].getsockname()[1]

    port = asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    yield fake, f"http://127.0.0.1:{port}/v1/chat/completions"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not cond():
        time.sleep(0.02)
    return cond()


async def _one(url, abort_after):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        return await stream_request(session, url, {"model": "m"}, abort_after, 10, index=7)


def test_stream_read_to_the_end(fake_server):
    fake, url = fake_server
    rec = asyncio.run(_one(url, None))
    assert (rec.outcome, rec.chunks, rec.completion_tokens, rec.error) == ("completed", 20, 20, None)
    assert rec.index == 7 and _wait_for(lambda: fake.finished == 1)


@pytest.mark.parametrize("after", [0, 3])
def test_stream_abort_closes_the_connection(fake_server, after):
    fake, url = fake_server
    rec = asyncio.run(_one(url, after))
    assert (rec.outcome, rec.chunks, rec.error) == ("aborted", after, None)
    # the server sees the client leave: it does not stream the rest
    assert _wait_for(lambda: fake.disconnected == 1), "server never saw the abort"
    assert fake.finished == 0


def test_http_error_is_recorded_not_raised(fake_server):
    _, url = fake_server
    rec = asyncio.run(_one(url.replace("/chat/", "/nothing/"), None))
    assert rec.outcome == "error" and rec.error.startswith("HTTP 404")


def _batch(url, plan, concurrency):
    import aiohttp

    async def go():
        async with aiohttp.ClientSession() as session:
            return await soak.run_batch(session, url, "m", plan, concurrency=concurrency, timeout=10)

    return asyncio.run(go())


def test_batch_returns_every_request_with_its_outcome(fake_server):
    fake, url = fake_server
    plan = [PlannedRequest(i, "short", 0, i, 16, 0.0, 2 if i % 3 == 0 else None)
            for i in range(12)]
    recs = _batch(url, plan, 3)
    assert [r.index for r in recs] == list(range(12))
    assert [r.outcome for r in recs] == ["aborted" if i % 3 == 0 else "completed" for i in range(12)]
    assert _wait_for(lambda: fake.disconnected == 4) and fake.finished == 8


def test_batch_keeps_to_the_concurrency(fake_server):
    # no aborts here: the server would count an aborted stream until its next write
    fake, url = fake_server
    recs = _batch(url, [PlannedRequest(i, "short", 0, i, 16, 0.0, None) for i in range(9)], 3)
    assert all(r.outcome == "completed" for r in recs)
    assert fake.max_in_flight == 3


# ==========================================================================
# Process-tree memory
# ==========================================================================
def test_process_roles():
    assert process_role("python -m vllm.entrypoints.openai.api_server", True) == "api_server"
    assert process_role("VLLM::EngineCore", False) == "engine_core"
    assert process_role("VLLM::Worker_TP0", False) == "worker"
    assert process_role("python -c from multiprocessing.resource_tracker import main", False) == "other"


def test_process_tree_memory_finds_children_by_title():
    pytest.importorskip("psutil")
    # Children whose command lines carry vLLM's titles stand in for the engine.
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", title])
            for title in ("VLLM::EngineCore", "VLLM::Worker")]
    try:
        assert _wait_for(lambda: len(process_tree_memory(os.getpid())["processes"]) >= 3)
        mem = process_tree_memory(os.getpid())
        roles = {p["pid"]: p["role"] for p in mem["processes"]}
        assert roles[os.getpid()] == "api_server"
        assert roles[kids[0].pid] == "engine_core" and roles[kids[1].pid] == "worker"
        assert mem["engine"] == mem["engine_core"] + mem["worker"] > 0
        assert mem["total"] == sum(p["rss"] for p in mem["processes"])
    finally:
        for k in kids:
            k.kill()
            k.wait()
    assert process_tree_memory(kids[0].pid)["total"] is None  # gone: no numbers, no crash


# ==========================================================================
# Slopes and verdicts
# ==========================================================================
def _points(f, n=2000, every=100, noise=0.0):
    # deterministic "noise": a fixed zig-zag
    return [(float(x), f(x) + (noise if (x // every) % 2 else -noise)) for x in range(0, n + 1, every)]


def test_slope_is_exact_on_a_line():
    assert slope_per_1000(_points(lambda x: 3600 + 0.05 * x)) == pytest.approx(50.0)
    assert slope_per_1000([(0.0, 1.0)]) is None
    assert slope_per_1000([(5.0, 1.0), (5.0, 2.0)]) is None


def _verdict(points):
    return growth_verdict(points, level_slope=20.0, level_fraction=0.25)


def test_verdict_growing():
    v = _verdict(_points(lambda x: 3600 + 0.1 * x, noise=2))
    assert v["verdict"] == "still growing" and v["levels_off"] is False
    assert v["first_half_slope"] == pytest.approx(100, abs=5)
    assert v["second_half_slope"] == pytest.approx(100, abs=5)


def test_verdict_levelling():
    v = _verdict(_points(lambda x: 3600 + 400 * (1 - math.exp(-x / 250))))
    assert v["verdict"] == "levels off" and v["levels_off"] is True
    assert v["first_half_slope"] > 100 > 20 > v["second_half_slope"]
    assert v["start_mb"] == pytest.approx(3600) and v["warm_at"] == 200
    assert v["end_mb"] == pytest.approx(4000, abs=1)


def test_verdict_flat():
    v = _verdict(_points(lambda x: 3600.0, noise=3))
    assert v["verdict"] == "flat" and v["levels_off"] is True


def test_verdict_slowing_is_only_the_relative_rule():
    # 400 MB/1000 then 60 MB/1000: under a quarter of the first half, above 20
    v = _verdict(_points(lambda x: 3600 + (0.4 * x if x <= 1000 else 400 + 0.06 * (x - 1000))))
    assert v["verdict"] == "levels off (relative rule only)" and v["levels_off"] is True
    assert "above 20" in v["reason"]


def test_verdict_needs_two_samples_per_half():
    v = _verdict([(0.0, 1.0), (100.0, 2.0)])
    assert v["verdict"] == "too few samples" and v["levels_off"] is None
    assert _verdict([])["verdict"] == "no data"
    # the middle sample belongs to both halves: 0, 100, 200 is enough
    assert _verdict([(0.0, 1.0), (100.0, 1.0), (200.0, 1.0)])["verdict"] == "flat"


def test_comparison_with_none():
    base = _verdict(_points(lambda x: 3600 + 0.005 * x))
    grows = _verdict(_points(lambda x: 3700 + 0.05 * x))
    same = _verdict(_points(lambda x: 3700 + 0.006 * x))
    state = _verdict(_points(lambda x: 0.03 * x))
    c = compare_with_baseline(grows, base, state, level_slope=20)
    assert c["excess_second_half_slope"] == pytest.approx(45)
    assert c["excess_growth_after_warmup_mb"] == pytest.approx(0.045 * 1800)
    assert c["added_growth_levels_off"] is False and "still growing" in c["verdict"]
    assert c["state_second_half_slope"] == pytest.approx(30)
    c = compare_with_baseline(same, base, {}, level_slope=20)
    assert c["added_growth_levels_off"] is True and "levels off" in c["verdict"]


def _samples(f, state=None, tracked=0, n=400, every=100):
    out = []
    for x in range(0, n + 1, every):
        probe = {"gc_objects": 1000, "plugin": None}
        if state is not None:
            probe["plugin"] = {"tracked_requests": tracked if x else 3,
                               "state_bytes": int(state(x) * soak.MB)}
        eng, api, core = int(f(x) * soak.MB), int(900 * soak.MB), int(800 * soak.MB)
        out.append({"requests": x, "elapsed_s": x / 10, "processes": 4, "probe": probe,
                    "rss": {"engine": eng, "total": eng + api, "api_server": api,
                            "engine_core": core, "worker": eng - core, "other": 0}})
    return out


def _data(tmp_path, **methods):
    cfg = config_from_args(_args("--requests", "400", "--sample-every", "100", "--out", str(tmp_path)),
                           registry=REGISTRY, has_arctic=False)
    config = soak._config_record(cfg, "/models/x")
    def run(samples):
        end = samples[-1]["rss"]["engine"]
        return {"status": "ok", "samples": samples,
                "counts": {"completed": 300, "aborted": 100, "error": 0},
                "finish_reasons": {"abort": 0, "length": 301},
                "after_trim": {"engine_before": end, "engine_after": end - int(50 * soak.MB)}}

    return {"config": config, "schedule": {},
            "methods": {label: {"label": label, **run(s)} for label, s in methods.items()}}


def test_compute_verdicts_reads_samples_and_probe(tmp_path):
    data = _data(tmp_path, none=_samples(lambda x: 3600 + 0.01 * x),
                 suffix_tree=_samples(lambda x: 3700 + 0.2 * x, state=lambda x: 0.01 * x, tracked=2))
    v = compute_verdicts(data["methods"], level_slope=20, level_fraction=0.25)
    assert v["none"]["engine"]["verdict"] == "flat" and "vs_none" not in v["none"]
    assert v["suffix_tree"]["engine"]["verdict"] == "still growing"
    assert v["suffix_tree"]["vs_none"]["excess_second_half_slope"] == pytest.approx(190)
    assert v["suffix_tree"]["plugin_state"]["second_half_slope"] == pytest.approx(10)
    # the start sample (table busy with the warm-up) is not an idle sample
    assert v["suffix_tree"]["max_tracked_requests_when_idle"] == 2
    assert v["none"]["max_tracked_requests_when_idle"] is None


# ==========================================================================
# Report
# ==========================================================================
def test_write_report(tmp_path):
    pytest.importorskip("matplotlib")
    data = _data(tmp_path, none=_samples(lambda x: 3600 + 0.01 * x),
                 suffix_tree=_samples(lambda x: 3700 + 0.2 * x, state=lambda x: 0.01 * x))
    data["methods"]["ngram"] = {"label": "ngram", "status": "failed", "error": "server exited",
                                "samples": [], "counts": {"completed": 0, "aborted": 0, "error": 0}}
    written = write_report(data, tmp_path)
    assert [p.name for p in written] == ["results.json", "results.md", "rss.png"]
    assert (tmp_path / "rss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["verdicts"]["suffix_tree"]["engine"]["verdict"] == "still growing"
    assert saved["config"]["requests"] == 400 and len(saved["methods"]["none"]["samples"]) == 5
    md = (tmp_path / "results.md").read_text()
    engine_table = md.split("## Engine processes")[1].split("## ")[0]
    rows = {line.split("|")[1].strip(): line for line in engine_table.splitlines()
            if line.startswith("| ") and "status" not in line}
    assert "| ok | 3600 | 3601 (@100) | 3604 |" in rows["none"] and "flat" in rows["none"]
    assert "still growing" in rows["suffix_tree"] and "+190.0 MB/1000 req over none" in md
    assert "FAILED: server exited" in md
    assert "3730 (−50)" in md  # suffix_tree's engine RSS after malloc_trim
    assert md == render_markdown(saved)
