"""One background thread per drafter for work that must not stall an engine step.

What runs here: building a long prompt's per-request state
(``Proposer.start_request``), saving state files, merging other replicas'
payloads. Everything that touches the proposer's shared state takes
:attr:`BackgroundWork.proposer_lock`; the step thread only *tries* that lock
and drafts nothing for a step that finds it busy (lossless), so it never waits.
"""

from __future__ import annotations

import logging
import threading
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable

logger = logging.getLogger("vllm_spec_plugins")


class BackgroundWork:
    def __init__(self, name: str = "vsp-background") -> None:
        # One thread: jobs run in submission order (a save never races an import).
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.proposer_lock = threading.Lock()
        self.errors = 0
        self.jobs = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        self.jobs += 1
        return self._pool.submit(fn, *args)

    def submit_locked(self, what: str, fn: Callable[..., Any], *args: Any,
                      after: Callable[[], None] | None = None) -> Future:
        """Run ``fn`` holding the proposer lock; a failure is logged, never raised.
        ``after`` runs still holding the lock (e.g. work the step deferred meanwhile)."""
        def job():
            with self.proposer_lock:
                try:
                    fn(*args)
                except Exception:  # noqa: BLE001 - background work is advisory
                    self.errors += 1
                    logger.warning("vllm-spec-plugins: %s failed (drafting goes on):\n%s",
                                   what, traceback.format_exc())
                if after is not None:
                    after()

        return self.submit(job)

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
