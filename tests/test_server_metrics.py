"""The drafter counters' way to the server's /metrics, without a server: files
written by a drafter process, read by the collector (server_metrics.py)."""

from __future__ import annotations

import json
import os

from vllm_spec_plugins.integration.server_metrics import DrafterCollector, MetricsFileWriter


def counters(n):
    return [("vsp_cascade_drafted_tokens_total", "help", {"source": "draft_model",
                                                           "position": "1"}, n),
            ("vsp_drafter_steps_total", "help", {"method": "cascade"}, 2 * n)]


def test_collector_reads_live_drafters_only(tmp_path):
    w = MetricsFileWriter(str(tmp_path))
    w.maybe_write(lambda: counters(5))
    w.maybe_write(lambda: counters(6))  # within the interval: not written
    assert w.writes == 1
    # a file of a process that is gone is ignored
    (tmp_path / "drafter-999999999.json").write_text(json.dumps({"counters": counters(100)}))
    (tmp_path / "drafter-bad.json").write_text("{")  # a damaged file too
    fams = {f.name: f for f in DrafterCollector(str(tmp_path)).collect()}
    # prometheus_client strips the _total suffix from a counter family's name
    drafted = fams["vsp_cascade_drafted_tokens"].samples
    assert [(s.labels, s.value) for s in drafted if s.name.endswith("_total")] == [
        ({"position": "1", "source": "draft_model"}, 5.0)]
    assert fams["vsp_drafter_steps"].samples[0].value == 10.0
    assert os.path.basename(w.path) == f"drafter-{os.getpid()}.json"


def test_without_a_directory_nothing_is_written(monkeypatch):
    monkeypatch.delenv("VSP_METRICS_DIR", raising=False)
    w = MetricsFileWriter()
    w.maybe_write(lambda: counters(1))
    assert w.path is None and w.writes == 0


def test_scorer_counters_reach_the_collector(tmp_path):
    """A lossy scorer's counters (integration/scoring.py) are written beside
    the drafter's and served by the same collector."""
    from vllm_spec_plugins.config import ScorerConfig
    from vllm_spec_plugins.integration.scoring import ScorerRuntime
    from vllm_spec_plugins.scorers.reflective import ReflectiveScorer

    rt = ScorerRuntime(ScorerConfig(name="reflective"), ReflectiveScorer([1, 2]))
    rt.metrics_file = MetricsFileWriter(str(tmp_path), name="scorer")
    rt.stats.update(standard_accepted=7, scorer_accepted=3, lossy_rows=4, lossless_rows=2)
    rt.metrics_file.maybe_write(rt.prometheus_counters)
    assert os.path.basename(rt.metrics_file.path) == f"scorer-{os.getpid()}.json"
    fams = {f.name: f for f in DrafterCollector(str(tmp_path)).collect()}
    acc = {s.labels["rule"]: s.value for s in fams["vsp_scorer_accepted_tokens"].samples
           if s.name.endswith("_total")}
    assert acc == {"standard": 7.0, "scorer": 3.0}
    rows = {s.labels["mode"]: s.value for s in fams["vsp_scorer_rows"].samples
            if s.name.endswith("_total")}
    assert rows == {"lossy": 4.0, "lossless": 2.0}
