"""The request table: the one record of which requests are live.

vLLM's custom-proposer interface has no request ids and no start/finish
callbacks; the runner patches (patches.py) give them to the drafter, which
keeps here, per request id: how many tokens the proposer has seen, the
proposer's per-request state (what ``Proposer.start_request`` returned; the
proposer keeps no registry of its own), and whether the request still drafts.

A prompt longer than ``inline_prompt_tokens`` is prepared on the background
thread: building its state (a suffix trie: ~3 ms at 4k tokens, up to ~200 ms
at 128k) would otherwise hold up every request in the step. Until it is ready
the request drafts nothing (lossless); then it catches up on the tokens
generated meanwhile.
"""

from __future__ import annotations

import logging
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .background import BackgroundWork

logger = logging.getLogger("vllm_spec_plugins")

#: Prompts up to this many tokens are prepared inline (well under a millisecond).
INLINE_PROMPT_TOKENS = 1024


@dataclass
class RequestRecord:
    req_id: str
    prompt_len: int
    num_seen: int                       # tokens already passed to the proposer
    state: Any = None                   # what Proposer.start_request returned
    preparing: Optional[Future] = None  # set while built on the background thread
    broken: bool = False                # the proposer failed for it: draft nothing more
    ready: bool = field(default=False)
    last_draft: Any = None              # the budget's record of the draft sent last step


class RequestTable:
    def __init__(self, proposer: Any, background: BackgroundWork,
                 inline_prompt_tokens: int = INLINE_PROMPT_TOKENS) -> None:
        self.proposer = proposer
        self.background = background
        self.inline_prompt_tokens = int(inline_prompt_tokens)
        self._records: dict[str, RequestRecord] = {}
        # Finished requests whose proposer state is not released yet (the
        # proposer lock was busy); released by whoever holds the lock next.
        self._finishing: list[tuple[RequestRecord, bool]] = []
        self.stats = {"started": 0, "finished": 0, "errors": 0, "prepared_in_background": 0,
                      "waiting_for_state_steps": 0}

    def __len__(self) -> int:
        return len(self._records) + len(self._finishing)

    @property
    def unreleased(self) -> int:
        """Finished requests whose proposer state is not released yet."""
        return len(self._finishing)

    def get(self, req_id: str) -> Optional[RequestRecord]:
        return self._records.get(req_id)

    # -- start -------------------------------------------------------------
    def start(self, req_id: str, prompt: np.ndarray) -> RequestRecord:
        """Register a request seen for the first time; its state is built now
        (short prompt) or on the background thread (long prompt)."""
        old = self._records.pop(req_id, None)
        if old is not None:  # an id reused before its finish reached us
            self._finishing.append((old, True))
        n = int(prompt.shape[0])
        rec = self._records[req_id] = RequestRecord(req_id, n, num_seen=n)
        self.stats["started"] += 1
        if n <= self.inline_prompt_tokens:
            self._install(rec, self._build, req_id, prompt)
        else:
            rec.preparing = self.background.submit(self.proposer.start_request, req_id,
                                                   prompt.copy())
            self.stats["prepared_in_background"] += 1
        return rec

    def _build(self, req_id: str, prompt: np.ndarray) -> Any:
        return self.proposer.start_request(req_id, prompt)

    def _install(self, rec: RequestRecord, fn, *args) -> None:
        try:
            rec.state = fn(*args)
            rec.ready = True
        except Exception:
            self.fail(rec, "start_request")

    def poll(self, rec: RequestRecord) -> bool:
        """Is the request's state ready (installing it if the background built it)?"""
        if rec.ready or rec.broken:
            return rec.ready and not rec.broken
        fut = rec.preparing
        if fut is None or not fut.done():
            self.stats["waiting_for_state_steps"] += 1
            return False
        rec.preparing = None
        self._install(rec, fut.result)
        return rec.ready and not rec.broken

    def fail(self, rec: RequestRecord, where: str) -> None:
        rec.broken = True
        self.stats["errors"] += 1
        logger.warning("vllm-spec-plugins: proposer failed in %s for request %s; this "
                       "request drafts nothing from now on:\n%s", where, rec.req_id,
                       traceback.format_exc())

    # -- finish ------------------------------------------------------------
    def finish(self, req_id: str, aborted: bool = False) -> bool:
        """Drop the request now; its proposer state is released at once if
        ``release_finished`` can run (the caller holds the proposer lock)."""
        rec = self._records.pop(req_id, None)
        if rec is None:
            return False
        if rec.preparing is not None:
            rec.preparing.cancel()
        self._finishing.append((rec, aborted))
        self.stats["finished"] += 1
        return True

    def release_finished(self) -> int:
        """Call with the proposer lock held: let the proposer learn from and
        release every finished request. Returns how many were released."""
        done = 0
        still_building = []
        while self._finishing:
            rec, aborted = self._finishing.pop(0)
            if rec.preparing is not None and not rec.preparing.done():
                # Its state is still being built on the background thread:
                # release it once built (a proposer's state may hold resources,
                # e.g. a draft model's KV cache, that only finish_request frees).
                still_building.append((rec, aborted))
                continue
            if rec.preparing is not None and not rec.ready:
                try:  # built in the background, never installed: release it too
                    if not rec.preparing.cancelled():
                        rec.state, rec.ready = rec.preparing.result(), True
                except Exception:  # noqa: BLE001 - its failure was its own
                    pass
            if rec.ready and not rec.broken:
                try:
                    self.proposer.finish_request(rec.state, aborted)
                except Exception:
                    self.fail(rec, "finish_request")
            rec.state = None
            done += 1
        self._finishing.extend(still_building)
        return done
