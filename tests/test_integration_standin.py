"""The integration layer driven by a stand-in runner (vllm_spec_plugins/bench/standin_runner.py):
lifecycle, long prompts prepared off the step, the proposer lock, failures,
budgets, step timing, background saves, the rank rule, startup errors and the
version policy. No engine: the real engine runs in tests/test_engine_*.py."""

from __future__ import annotations

import logging
import threading
import time

import numpy as np
import pytest

from recording_proposer import RecordingProposer  # noqa: F401 (built by name)
from vllm_spec_plugins.bench.standin_runner import StandInRequest, StandInRunner, vllm_config
from vllm_spec_plugins.integration import versions
from vllm_spec_plugins.integration.drafter import PluginDrafter
from vllm_spec_plugins.integration.replica_sharing import owns_replica_state

PROPOSER = "recording_proposer:RecordingProposer"


def make(settings=None, k=8, ranks=(0, 0, 1), **kw):
    cfg = vllm_config({"method": PROPOSER, **(settings or {})}, k=k, **kw)
    d = PluginDrafter(cfg, patch_runner=False, ranks=ranks)
    return d, d.proposer


def periodic(n, period=7, base=100):
    return [base + (i % period) for i in range(n)]


def test_lifecycle_delivers_every_token_once_and_releases_on_finish():
    d, p = make()
    r = StandInRunner(d)
    for i in range(3):
        r.add(StandInRequest(f"r{i}", periodic(20, base=10 * i), periodic(40, base=10 * i)[20:]))
    r.run()
    assert d.snapshot()["tracked_requests"] == 0
    got = {rid: seen for rid, seen, _ in p.finished}
    for i in range(3):
        assert got[f"r{i}"] == periodic(40, base=10 * i)[20:]  # every output token, in order
    assert r.accepted > 0 and d.stats["drafted_tokens"] > 0
    assert d.snapshot()["requests"]["started"] == 3


def test_abort_releases_state_and_reused_id_starts_fresh():
    d, p = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(12), periodic(60)[12:]))
    for _ in range(3):
        r.step()
    r.abort("a")
    r.step()
    assert d.snapshot()["tracked_requests"] == 0
    assert [f[0] for f in p.finished] == ["a"]
    r.add(StandInRequest("a", periodic(12), periodic(30)[12:]))  # vLLM resubmits aborted ids
    r.run()
    assert [f[0] for f in p.finished] == ["a", "a"]
    assert p.finished[1][1] == periodic(30)[12:]


def test_long_prompt_is_prepared_off_the_step(monkeypatch):
    """The step goes on while a long prompt's state is built; that request
    drafts nothing until its state is ready, then catches up."""
    monkeypatch.setattr("vllm_spec_plugins.integration.lifecycle.INLINE_PROMPT_TOKENS", 64)
    d, p = make({"block_start_over": 100})
    d.requests.inline_prompt_tokens = 64
    r = StandInRunner(d)
    r.add(StandInRequest("short", periodic(20), periodic(200)[20:]))
    r.add(StandInRequest("long", periodic(500, period=11), periodic(700, period=11)[500:]))
    for _ in range(5):  # would deadlock (until the proposer's 10 s guard) if the step waited
        out = r.step()
        assert out[1] == []  # the long request: no state yet, no draft
    assert d.snapshot()["requests"]["waiting_for_state_steps"] >= 5
    assert any(out[0] for out in [r.step()])  # the short one drafts meanwhile
    p.release.set()
    # Wait for the build itself: stepping meanwhile would race the background
    # thread (on a loaded machine the request could finish before it runs).
    d.requests.get("long").preparing.result(timeout=10)
    r.step()  # installs the state and catches up on the tokens generated meanwhile
    assert r.drafts.get("long"), "the long request did not draft once its state was ready"
    r.run()
    seen = {rid: s for rid, s, _ in p.finished}
    assert seen["long"] == periodic(700, period=11)[500:]  # caught up on every token
    assert p.start_threads.count("MainThread") == 1  # the short prompt only
    assert d.snapshot()["requests"]["prepared_in_background"] == 1


def test_request_finishing_before_its_state_is_built_is_still_released(monkeypatch):
    """A long prompt's state is still being built when the request finishes
    (and the engine goes idle): once built it must reach finish_request (a
    proposer's state may hold resources, e.g. a draft model's KV cache)."""
    monkeypatch.setattr("vllm_spec_plugins.integration.lifecycle.INLINE_PROMPT_TOKENS", 64)
    d, p = make({"block_start_over": 100})
    d.requests.inline_prompt_tokens = 64
    r = StandInRunner(d)
    r.add(StandInRequest("long", periodic(300, period=11), periodic(304, period=11)[300:]))
    while r.rows:
        r.step()
    r.step()  # the idle step: "long" finished, its state not built yet
    assert p.finished == [] and d.requests.unreleased == 1
    p.release.set()
    deadline = time.monotonic() + 10
    while d.requests.unreleased and time.monotonic() < deadline:
        time.sleep(0.01)  # the background thread releases it after the build
    assert [f[0] for f in p.finished] == ["long"]
    assert d.snapshot()["tracked_requests"] == 0


def test_busy_proposer_costs_drafts_not_waiting():
    d, p = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(60)[20:]))
    r.add(StandInRequest("b", periodic(20, base=7), periodic(24, base=7)[20:]))
    r.step()
    lock = d.background.proposer_lock
    assert lock.acquire(blocking=False)  # as a background save would
    try:
        for _ in range(6):
            assert all(draft == [] for draft in r.step())
        assert d.stats["busy_steps"] >= 6
        assert p.finished == []  # "b" finished meanwhile; released later, not lost
    finally:
        lock.release()
    r.run()
    assert sorted(f[0] for f in p.finished) == ["a", "b"]
    assert dict((f[0], f[1]) for f in p.finished)["a"] == periodic(60)[20:]


def test_idle_step_with_busy_proposer_releases_in_the_background():
    """The engine's last step before idling finds the proposer busy: no step
    follows, so the release is handed to the background thread, not left
    waiting for the next request."""
    d, p = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(40)[20:]))
    while r.rows:
        r.step()
    lock = d.background.proposer_lock
    assert lock.acquire(blocking=False)  # as a merge or a save would
    try:
        r.step()  # the idle step: finished ids, nothing scheduled
        assert p.finished == []
    finally:
        lock.release()
    d.background.submit(lambda: None).result(timeout=10)  # jobs run in order
    assert [f[0] for f in p.finished] == ["a"]
    assert d.snapshot()["tracked_requests"] == 0


@pytest.mark.parametrize("fail_on", ["start", "propose", "tokens"])
def test_failing_request_costs_its_drafts_only(fail_on, caplog):
    d, p = make({"fail_on": fail_on})
    r = StandInRunner(d)
    r.add(StandInRequest("boom", periodic(20), periodic(50)[20:]))
    r.add(StandInRequest("ok", periodic(20, base=3), periodic(50, base=3)[20:]))
    with caplog.at_level(logging.WARNING, logger="vllm_spec_plugins"):
        r.run()
    snap = d.snapshot()
    assert snap["errors"] >= 1 and snap["tracked_requests"] == 0
    assert "drafts nothing from now on" in caplog.text
    assert dict((f[0], f[1]) for f in p.finished)["ok"] == periodic(50, base=3)[20:]
    assert r.accepted > 0


def test_failing_batch_falls_back_row_by_row():
    d, p = make({"fail_on": "batch"})
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(60)[20:]))
    r.run()
    assert d.stats["drafted_tokens"] > 0 and r.accepted > 0


def test_draft_budget_caps():
    d, _ = make(k=8)
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(200)[20:]))
    r.step()
    assert len(r.step()[0]) > 2
    assert 0 < len(r.step(budget=2)[0]) <= 2  # the scheduler's per-step budget


def test_drafts_never_run_past_max_model_len():
    d, _ = make(k=8, max_model_len=60)
    r = StandInRunner(d, max_len=64)
    r.add(StandInRequest("a", periodic(20), periodic(59)[20:]))
    while r.rows:
        out = r.step()
        if r.rows:
            n = len(r.rows[0].prompt) + len(r.rows[0].output)
            assert n + len(out[0]) + 1 <= 60  # context + drafts + the bonus token


def test_decode_steps_are_timed():
    d, _ = make()
    r = StandInRunner(d)
    r.add(StandInRequest("a", periodic(20), periodic(120)[20:]))
    r.run()
    assert d.timer.model.stats["steps"] > 10


def test_autosave_runs_in_the_background(tmp_path):
    state = tmp_path / "state.txt"
    d, p = make({"state_path": str(state)})
    d.saver.every = 2
    r = StandInRunner(d)
    for i in range(4):
        r.add(StandInRequest(f"r{i}", periodic(10, base=i), periodic(16, base=i)[10:]))
    r.run()
    deadline = time.monotonic() + 5
    while not (p.save_threads and d.saver.saves) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert p.save_threads and all(t != "MainThread" for t in p.save_threads)
    assert state.read_text() in {"2", "3", "4"}
    d.saver.save_at_exit()
    assert state.read_text() == "4" and p.save_threads[-1] == "MainThread"


def test_only_the_owner_rank_saves_and_shares(tmp_path):
    assert owns_replica_state(0, 0, 1)
    assert not owns_replica_state(1, 0, 1)  # TP rank 1: its drafts are never used
    assert owns_replica_state(0, 1, 2) and not owns_replica_state(0, 0, 2)  # last PP stage
    extra = {"spec_plugins_sharing": {"hub": "h", "ray_address": "127.0.0.1:1"}}
    d, _ = make({"state_path": str(tmp_path / "s")}, ranks=(1, 0, 1), **extra)
    assert not d.saver.enabled and d.sharing is None and d.snapshot()["owner_rank"] is False


@pytest.mark.parametrize("k, needle", [(129, "at most 128"), (0, ">= 1")])
def test_num_speculative_tokens_out_of_range(k, needle):
    with pytest.raises(ValueError, match=needle):
        make(k=k)


def test_state_path_checked_at_startup(tmp_path):
    with pytest.raises(ValueError, match=r"spec_plugins\.state_path: .* is a directory"):
        make({"state_path": str(tmp_path)})
    with pytest.raises(ValueError, match=r"spec_plugins\.state_path: directory .* does not exist"):
        make({"state_path": str(tmp_path / "nope" / "s.npz")})


def test_unsupported_vllm_registers_nothing_and_fails_only_when_selected(monkeypatch, caplog):
    from vllm_spec_plugins.integration import patches, registration

    monkeypatch.setattr(versions, "installed_vllm_version", lambda: "0.99.0")
    monkeypatch.delenv(versions.ALLOW_UNSUPPORTED_ENV, raising=False)
    monkeypatch.setattr(registration, "_warned_unsupported", False)
    applied = []
    monkeypatch.setattr(patches, "apply_patches", lambda ps: applied.extend(ps))
    with caplog.at_level(logging.WARNING, logger="vllm_spec_plugins"):
        registration.register()
        registration.register()
    assert applied == []
    assert caplog.text.count("supports vLLM 0.32.0 but found vLLM 0.99.0") == 1
    with pytest.raises(versions.UnsupportedVLLMError, match=r"vllm-spec-plugins\[cpu\].*"
                       + versions.ALLOW_UNSUPPORTED_ENV):
        make()
    monkeypatch.setenv(versions.ALLOW_UNSUPPORTED_ENV, "1")
    make()  # the override lets it run


def test_step_budget_never_exceeds_vllm_limit():
    d, _ = make(k=128)
    r = StandInRunner(d, max_len=1024)
    r.add(StandInRequest("a", periodic(300, period=3), periodic(600, period=3)[300:]))
    for _ in range(3):
        out = r.step()
        assert len(out[0]) <= 128
