"""The drafter's counters on the OpenAI server's ``/metrics`` (Prometheus).

The drafter runs in vLLM's engine-core process; ``/metrics`` is served by
the API-server process. The plugin's entry point runs in both, API server
first: there it makes a directory, names it in ``VSP_METRICS_DIR`` (the
engine processes it starts inherit it) and registers a Prometheus collector.
Each drafter writes its counters there as a small JSON file, at most once a
second, off nothing but its own step; the collector reads the files of live
processes when ``/metrics`` is scraped.

Exposed (``vsp_`` prefix; a counter per label set):

* ``vsp_drafter_steps_total``, ``vsp_drafter_drafted_tokens_total``,
  ``vsp_drafter_errors_total`` by ``method``;
* ``vsp_draft_budget_tokens_total`` by ``method`` and ``stage``
  (proposed, kept, accepted);
* the lossy scorer's (``integration/scoring.py``, any proposer):
  ``vsp_scorer_accepted_tokens_total`` by ``scorer`` and ``rule`` (standard:
  the lossless rule accepted it; scorer: only the scorer did),
  ``vsp_scorer_rows_total`` by ``mode`` (lossy, lossless) and
  ``vsp_scorer_errors_total``;
* what the proposer adds (``Proposer.prometheus_counters``), e.g. the
  cascade's ``vsp_cascade_drafted_tokens_total`` and
  ``vsp_cascade_accepted_tokens_total`` by ``source`` and ``position``.

With ``--api-server-count`` > 1 vLLM serves ``/metrics`` from Prometheus'
multiprocess registry, which this collector is not part of.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Iterable, Optional

from vllm_spec_plugins.proposers.base import pid_alive

logger = logging.getLogger("vllm_spec_plugins")

METRICS_DIR_ENV = "VSP_METRICS_DIR"
#: Write a drafter's file at most this often (seconds).
WRITE_INTERVAL_S = 1.0

_installed = False


def install_collector() -> None:
    """In a main process (the API server, or the ``LLM`` user's process):
    make the metrics directory and register the collector; the engine
    processes it starts (multiprocessing children, named otherwise) inherit
    the directory. A main process replaces an inherited directory: a server
    started from another plugin process must serve its own drafters only.
    Never raises."""
    import multiprocessing

    global _installed
    if _installed or multiprocessing.current_process().name != "MainProcess":
        return
    _installed = True
    try:
        d = tempfile.mkdtemp(prefix="vsp-metrics-")
        os.environ[METRICS_DIR_ENV] = d
        atexit.register(shutil.rmtree, d, True)
        from prometheus_client import REGISTRY

        REGISTRY.register(DrafterCollector(d))
    except Exception as e:  # noqa: BLE001 - metrics are optional
        logger.debug("vllm-spec-plugins: drafter metrics on /metrics unavailable (%s)", e)


class DrafterCollector:
    """A Prometheus collector over the drafters' files (see module note)."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def describe(self) -> list:
        return []  # unknown until scraped: skip the registry's duplicate check

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily

        families: dict[str, Any] = {}
        paths = (glob.glob(os.path.join(self.directory, "drafter-*.json"))
                 + glob.glob(os.path.join(self.directory, "scorer-*.json")))
        for path in paths:
            try:
                pid = int(os.path.basename(path).rsplit("-", 1)[1][:-len(".json")])
                if not pid_alive(pid):
                    continue
                with open(path) as f:
                    counters = json.load(f)["counters"]
            except (OSError, ValueError, KeyError):
                continue
            for name, doc, labels, value in counters:
                fam = families.get(name)
                if fam is None:
                    fam = families[name] = (CounterMetricFamily(name, doc, labels=sorted(labels)),
                                            sorted(labels))
                fam[0].add_metric([str(labels[k]) for k in fam[1]], float(value))
        return [fam for fam, _ in families.values()]


class MetricsFileWriter:
    """Writes one drafter's (or scorer's: ``name``) counters for :class:`DrafterCollector`."""

    def __init__(self, directory: Optional[str] = None, name: str = "drafter") -> None:
        self.directory = directory if directory is not None else os.environ.get(METRICS_DIR_ENV)
        self.path = (os.path.join(self.directory, f"{name}-{os.getpid()}.json")
                     if self.directory else None)
        self._last = 0.0
        self.writes = 0

    def maybe_write(self, counters_fn, force: bool = False) -> None:
        """Write ``counters_fn()`` if the interval has passed (or ``force``:
        the engine goes idle, so no later step would). Never raises."""
        if self.path is None:
            return
        now = time.monotonic()
        if not force and now - self._last < WRITE_INTERVAL_S:
            return
        self._last = now
        try:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"counters": counters_fn()}, f)
            os.replace(tmp, self.path)
            self.writes += 1
        except Exception as e:  # noqa: BLE001 - metrics must never cost a step
            logger.debug("vllm-spec-plugins: writing drafter metrics failed (%s)", e)
