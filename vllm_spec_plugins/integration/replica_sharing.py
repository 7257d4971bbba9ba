"""Which rank owns a replica's shared state, and the glue to the sharing hub.

With tensor (or pipeline) parallelism vLLM builds a drafter on every rank;
only one rank per engine may push to and pull from the hub and write state
files, else every payload arrives (and every file is written) once per rank.
The owner is tensor-parallel rank 0 of the last pipeline stage (where
sampling, and so drafting, happens).

Pulled payloads are merged on the background thread (a payload can be large);
exporting is cheap (what was learnt since the last push) and runs on the step
thread, only when the proposer lock is free.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any

from .background import BackgroundWork

logger = logging.getLogger("vllm_spec_plugins")


def owns_replica_state(tp_rank: int, pp_rank: int, pp_size: int) -> bool:
    return int(tp_rank) == 0 and int(pp_rank) == int(pp_size) - 1


def current_ranks() -> tuple[int, int, int]:
    """(tensor-parallel rank, pipeline rank, pipeline size) of this worker;
    (0, 0, 1) when vLLM's parallel state is not initialised."""
    try:
        from vllm.distributed import parallel_state as ps

        tp = int(ps.get_tensor_model_parallel_rank())
        pp_group = ps.get_pp_group()
        return tp, int(pp_group.rank_in_group), int(pp_group.world_size)
    except Exception:  # noqa: BLE001 - not initialised (tests, single process)
        return 0, 0, 1


class ReplicaSharing:
    def __init__(self, client: Any, proposer: Any, background: BackgroundWork,
                 after_merge=None) -> None:
        self.client = client
        self.proposer = proposer
        self.background = background
        self._after = after_merge
        self.merged = 0
        self.errors = 0
        proposer.enable_sharing()
        client.start()  # connected before the first request arrives

    def tick(self, force: bool = False) -> None:
        """From the step thread: push/pull if due; never waits on Ray or the lock.
        ``force`` is the engine going idle: no further step will come, so a
        push the busy lock prevents is handed to the background thread."""
        lock = self.background.proposer_lock
        if not lock.acquire(blocking=False):
            if force:  # a background job holds the proposer: push right after it
                self.background.submit_locked("pushing shared state", self._tick_locked, True)
            return
        try:
            self._tick_locked(force)
        finally:
            lock.release()

    def _tick_locked(self, force: bool) -> None:
        try:
            payloads = self.client.tick(self.proposer.export_shared, force=force)
        except Exception:  # noqa: BLE001
            self.errors += 1
            logger.warning("vllm-spec-plugins: sharing failed (drafting goes on from the "
                           "local cache):\n%s", traceback.format_exc())
            return
        if payloads:
            self.background.submit_locked("merging shared state", self._merge, payloads,
                                          after=self._after)

    def _merge(self, payloads: list) -> None:
        for payload in payloads:
            self.proposer.import_shared(payload)
            self.merged += 1

    def flush(self, timeout_s: float) -> dict[str, Any]:
        """Push now and merge what the others pushed, waiting up to ``timeout_s``
        (tests, planned shutdown; never from the step loop)."""
        with self.background.proposer_lock:
            payloads = self.client.flush(self.proposer.export_shared, timeout_s)
            self._merge(payloads)
        return dict(self.client.stats, shared_in=self.merged)

    def stats(self) -> dict[str, Any]:
        return dict(self.client.stats, shared_in=self.merged, merge_errors=self.errors)
