"""Cross-replica sharing: the hub's log, proposers' export/import (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from vllm_spec_plugins.config import SharingConfig, SuffixRecyclingConfig, SuffixTreeConfig
from vllm_spec_plugins.config import TokenRecyclingConfig
from vllm_spec_plugins.proposers.suffix_recycling import SuffixRecyclingProposer
from vllm_spec_plugins.proposers.suffix_tree import SuffixTreeProposer
from vllm_spec_plugins.proposers.token_recycling import TokenRecyclingProposer
from vllm_spec_plugins.sharing import SharedStateHub, payload_nbytes


def test_hub_log_is_per_replica_ordered_and_bounded():
    hub = SharedStateHub(max_bytes=10_000)
    a1 = hub.push("A", {"x": np.arange(10)})
    b1 = hub.push("B", {"x": np.arange(5)})
    assert (a1, b1) == (1, 2)
    latest, got = hub.pull("B", since=0)
    assert latest == 2 and len(got) == 1 and got[0]["x"].tolist() == list(range(10))
    latest, got = hub.pull("C", since=1)  # a new replica: everything after 1
    assert [g["x"].size for g in got] == [5]
    assert hub.pull("A", since=2) == (2, [])
    # Memory bound: the oldest payloads go first; one too big is refused.
    size = payload_nbytes({"x": np.zeros(500, np.int32)})
    for _ in range(20):
        hub.push("A", {"x": np.zeros(500, np.int32)})
    st = hub.stats()
    assert st["bytes"] <= 10_000 and st["evicted"] > 0 and st["payloads"] == 10_000 // size
    assert hub.push("A", {"x": np.zeros(10_000, np.int32)}) == 0
    assert hub.stats()["pushes"] == 23
    # Per-replica traffic: A pushed 22 (the refused one counts), B got one of A's.
    reps = hub.stats()["replicas"]
    assert reps["A"]["pushed"] == 22 and reps["B"] == {"pushed": 1, "received": 1}
    assert reps["C"] == {"pushed": 0, "received": 1}


def test_hub_forgets_the_least_recent_replicas_beyond_its_bound(monkeypatch):
    import vllm_spec_plugins.sharing as sharing

    monkeypatch.setattr(sharing, "_MAX_REPLICAS_TRACKED", 3)
    hub = SharedStateHub()
    for r in "ABCD":
        hub.push(r, {"x": 1})
    hub.pull("B")
    assert list(hub.stats()["replicas"]) == ["C", "D", "B"]


def suffix(**cfg) -> SuffixTreeProposer:
    return SuffixTreeProposer(SuffixTreeConfig(**cfg), 8)


def serve(p, req_id, prompt, output):
    r = p.start_request(req_id, np.array(prompt, np.int32))
    p.on_tokens(r, np.array(output, np.int32))
    p.finish_request(r)


def test_suffix_responses_travel_and_draft_on_the_other_replica():
    a, b = suffix(), suffix()
    assert a.export_shared() is None  # sharing not enabled: nothing recorded
    a.enable_sharing()
    b.enable_sharing()
    out = list(range(100, 140))
    serve(a, "r1", [1, 2, 3], out)
    payload = a.export_shared()
    assert [r.tolist() for r in payload["suffix_responses"]] == [out]
    assert a.export_shared() is None  # exported once
    prompt = np.array([7, 8] + out[:10], np.int32)
    r2 = b.start_request("r2", prompt)
    assert b.propose(r2, prompt, 8) == []  # B never saw it
    b.import_shared(payload)
    assert b.propose(r2, prompt, 8) == out[10:18]  # from A's response
    assert b.export_shared() is None  # imported responses are not re-exported
    b.import_shared({"recycling_rows": {}})  # another method's payload: ignored


def test_suffix_outbox_is_bounded_when_nobody_collects():
    p = suffix(max_cached_requests=3)
    p.enable_sharing()
    for i in range(10):
        serve(p, f"r{i}", [1], [i + 10, i + 11])
    assert len(p.export_shared()["suffix_responses"]) == 3


def recycling(**cfg) -> TokenRecyclingProposer:
    return TokenRecyclingProposer(TokenRecyclingConfig(topk=4, tree_breadth=[1], **cfg), 8)


def test_recycling_rows_travel_with_their_record():
    a, b = recycling(), recycling()
    a.enable_sharing()
    ids = np.array([[6, 7, -1, -1], [8, 9, -1, -1]], np.int32)
    probs = np.array([[0.9, 0.05, 0, 0], [0.8, 0.1, 0, 0]], np.float32)
    a.on_target_topk(None, np.array([5, 6], np.int32), ids, probs)
    a.on_target_topk(None, np.array([5], np.int32), ids[1:], probs[1:])  # scored overwrite
    payload = a.export_shared()
    rows = payload["recycling_rows"]
    assert rows["tokens"].tolist() == [5, 6]
    assert rows["row_trials"].tolist() == [1.0, 0.0]
    assert a.export_shared() is None
    b.import_shared(payload)
    assert b.matrix.row(5) == a.matrix.row(5) and b.matrix.row(6) == a.matrix.row(6)
    assert b.matrix.row_trials[5] == 1.0
    assert b.propose(None, np.array([5], np.int32), 4) == a.propose(None, np.array([5], np.int32), 4)
    # Another width, or malformed rows: ignored / refused without a change.
    before = b.matrix.ids.copy()
    b.import_shared({"recycling_rows": dict(rows, k=8)})
    with pytest.raises(ValueError):
        b.matrix.import_rows(rows["tokens"], rows["ids"][:, :2], rows["probs"],
                             rows["row_hits"], rows["row_trials"])
    bad = dict(rows, probs=rows["probs"] * 5)  # out of [0, 1]: those rows are dropped
    b.import_shared({"recycling_rows": bad})
    assert np.array_equal(b.matrix.ids, before)


def test_hybrid_exports_both_halves():
    h = SuffixRecyclingProposer(SuffixRecyclingConfig(token_recycling={"topk": 4}), 8)
    h.enable_sharing()
    r = h.start_request("r", np.array([1, 2], np.int32))
    h.on_target_topk(r, np.array([2], np.int32), np.array([[3, 4, -1, -1]], np.int32),
                     np.array([[0.7, 0.2, 0, 0]], np.float32))
    h.on_tokens(r, np.array([3, 4, 5], np.int32))
    h.finish_request(r)
    payload = h.export_shared()
    assert set(payload) == {"suffix_responses", "recycling_rows"}
    other = SuffixRecyclingProposer(SuffixRecyclingConfig(token_recycling={"topk": 4}), 8)
    other.import_shared(payload)
    assert other.recycling.matrix.row(2)[0] == [3, 4]
    assert len(other.suffix.cached_responses()) == 1


def test_sharing_config_validation():
    assert SharingConfig().hub == "vllm-spec-plugins-hub"
    with pytest.raises(ValueError):
        SharingConfig(interval_s=0)
    with pytest.raises(ValueError):
        SharingConfig(hubb="x")


class _FakeRemote:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, args))
        return None


class _FakeHub:
    def __init__(self):
        self.calls = []
        self.push = _FakeRemote(self.calls, "push")
        self.pull = _FakeRemote(self.calls, "pull")


def test_hub_client_connects_at_start_so_the_first_step_pushes(monkeypatch):
    # Connecting from the first step instead would leave a replica whose
    # first requests end before Ray answers holding their state until its
    # next request: start() must connect before any step runs.
    from vllm_spec_plugins.sharing import HubClient

    hub = _FakeHub()
    client = HubClient(SharingConfig(interval_s=60), replica="A")
    monkeypatch.setattr(client, "_connect", lambda: hub)
    client.start()
    client._connecting.join(5)
    assert client._hub is hub
    client.tick(lambda: {"learnt": 1})
    assert ("push", ("A", {"learnt": 1})) in hub.calls
    assert client.stats["pushed"] == 1
    # Within interval_s nothing more is pushed unless forced (the idle step).
    client.tick(lambda: {"learnt": 2})
    assert client.stats["pushed"] == 1
    client.tick(lambda: {"learnt": 3}, force=True)
    assert client.stats["pushed"] == 2


def test_hub_client_start_failure_is_logged_and_retried_later(monkeypatch, caplog):
    from vllm_spec_plugins.sharing import HubClient

    now = [100.0]
    client = HubClient(SharingConfig(retry_s=30), replica="A", clock=lambda: now[0])

    def refuse():
        raise ConnectionError("no Ray here")

    monkeypatch.setattr(client, "_connect", refuse)
    client.start()
    client._connecting.join(5)
    assert client._hub is None and client.stats["sync_errors"] == 1
    assert "unreachable" in caplog.text and "retries every 30 s" in caplog.text
    client.tick(lambda: None)  # before retry_s: no new attempt
    assert not client._connecting.is_alive() and client.stats["sync_errors"] == 1
    now[0] += 31
    client.tick(lambda: None)  # after retry_s: tries again (and fails again)
    client._connecting.join(5)
    assert client.stats["sync_errors"] == 2


class _SharingProposer:
    def __init__(self):
        self.exports = 0

    def enable_sharing(self):
        pass

    def export_shared(self):
        self.exports += 1
        return {"learnt": self.exports}

    def import_shared(self, payload):
        pass


def test_idle_push_with_busy_proposer_runs_after_the_busy_job(monkeypatch):
    # The idle step is the last one an engine runs until its next request: a
    # push it cannot do (a merge holds the proposer) must not wait for that.
    from vllm_spec_plugins.integration.background import BackgroundWork
    from vllm_spec_plugins.integration.replica_sharing import ReplicaSharing
    from vllm_spec_plugins.sharing import HubClient

    hub = _FakeHub()
    client = HubClient(SharingConfig(interval_s=60), replica="A")
    monkeypatch.setattr(client, "_connect", lambda: hub)
    background = BackgroundWork()
    sharing = ReplicaSharing(client, _SharingProposer(), background)
    client._connecting.join(5)
    sharing.tick()  # connected: the first tick pushes
    assert client.stats["pushed"] == 1
    with background.proposer_lock:
        sharing.tick()            # a busy step, not idle: skipped, no job
        sharing.tick(force=True)  # the idle step: handed to the background
        assert client.stats["pushed"] == 1
    background.submit(lambda: None).result(timeout=10)
    assert client.stats["pushed"] == 2
    assert ("push", ("A", {"learnt": 2})) in hub.calls
    background.shutdown()
