"""Share proposer state (suffix-tree responses, Token Recycling rows) across
replicas through a named Ray actor.

Each replica's drafter pushes what its proposer learnt since the last push
(``Proposer.export_shared``) and pulls what the other replicas pushed
(``Proposer.import_shared``), every ``interval_s`` seconds, from the step
loop and without ever waiting on Ray: a push is fire-and-forget, a pull is
collected on a later step once it is ready. So a response served by replica
A warms replica B's suffix cache a few seconds later, and a replica that
restarts pulls everything the hub still holds.

* :class:`SharedStateHub`: the actor's logic, plain Python (tested alone).
  A bounded log of payloads (oldest evicted past ``max_bytes``), each with a
  sequence number and the replica that sent it.
* :class:`HubClient`: the drafter side. Starts connecting when the drafter
  is built (``ray.init(address="auto")`` when the process is not in Ray
  already, on a background thread), creates the hub if
  absent (``get_if_exists``), and if the hub is gone or Ray is unreachable
  logs once and retries later: the replica keeps drafting from its local
  cache meanwhile.

Only the integration layer constructs a HubClient, and only when the engine
config asks for sharing; nothing imports Ray otherwise.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
import uuid
from collections import OrderedDict, deque
from typing import Any, Optional

from vllm_spec_plugins.config import SharingConfig

logger = logging.getLogger(__name__)

_MAX_REPLICAS_TRACKED = 256

__all__ = ["SharedStateHub", "HubClient", "SharingConfig", "payload_nbytes"]


def payload_nbytes(payload: Any) -> int:
    """Size used for the hub's memory bound (numpy arrays by nbytes)."""
    try:
        return len(pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:  # noqa: BLE001 - unpicklable payloads never reach the hub
        return 0


class SharedStateHub:
    """A bounded log of proposer payloads, readable by sequence number."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._log: deque[tuple[int, str, Any, int]] = deque()
        self._bytes = 0
        self._next = 1
        self._pushes = 0
        self._evicted = 0
        # Per replica: payloads pushed / payloads of others handed to it. At
        # most _MAX_REPLICAS_TRACKED entries (restarts bring new ids; the
        # least recently seen are forgotten).
        self._replicas: OrderedDict[str, list[int]] = OrderedDict()

    def push(self, replica: str, payload: Any) -> int:
        """Append ``payload`` from ``replica``; returns its sequence number
        (0 if it alone exceeds the bound and was dropped)."""
        size = payload_nbytes(payload)
        self._pushes += 1
        self._seen(replica)[0] += 1
        if size > self.max_bytes or size == 0:
            return 0
        seq = self._next
        self._next += 1
        self._log.append((seq, replica, payload, size))
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, _, _, s = self._log.popleft()
            self._bytes -= s
            self._evicted += 1
        return seq

    def pull(self, replica: str, since: int = 0) -> tuple[int, list[Any]]:
        """Payloads newer than ``since`` from other replicas, oldest first,
        and the newest sequence number (pass it as ``since`` next time)."""
        out = [p for seq, src, p, _ in self._log if seq > since and src != replica]
        self._seen(replica)[1] += len(out)
        return self._next - 1, out

    def _seen(self, replica: str) -> list[int]:
        rec = self._replicas.pop(replica, None) or [0, 0]
        self._replicas[replica] = rec
        while len(self._replicas) > _MAX_REPLICAS_TRACKED:
            self._replicas.popitem(last=False)
        return rec

    def stats(self) -> dict[str, Any]:
        return {"payloads": len(self._log), "bytes": self._bytes, "pushes": self._pushes,
                "evicted": self._evicted, "latest": self._next - 1,
                "replicas": {r: {"pushed": p, "received": n}
                             for r, (p, n) in self._replicas.items()}}


class HubClient:
    """The drafter's side of the hub: never blocks the step loop."""

    def __init__(self, config: SharingConfig, replica: Optional[str] = None,
                 clock=time.monotonic) -> None:
        self.config = config
        self.replica = replica or f"{os.uname().nodename}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._clock = clock
        self._hub = None
        self._since = 0
        self._pending_pull = None
        self._last_sync = -float("inf")
        self._retry_at = 0.0
        self._warned = False
        self._connecting: Optional[threading.Thread] = None
        self.stats = {"pushed": 0, "pulled": 0, "sync_errors": 0}
        # The connect thread and the step thread (or a flush) both change the
        # fields above: every read-modify-write of them holds this lock. Slow
        # work (joining Ray) runs outside it; Ray calls made under it
        # (.remote(), ray.wait(timeout=0)) never block.
        self._lock = threading.RLock()

    # -- connection --------------------------------------------------------
    def _connect(self):
        import ray

        if not ray.is_initialized():
            ray.init(address=self.config.ray_address, namespace=self.config.namespace,
                     log_to_driver=False, ignore_reinit_error=True)
        actor_cls = ray.remote(num_cpus=0)(SharedStateHub)
        return actor_cls.options(name=self.config.hub, namespace=self.config.namespace,
                                 lifetime="detached", get_if_exists=True,
                                 max_restarts=-1).remote(self.config.max_hub_mb << 20)

    def _connect_in_background(self) -> None:
        """Joining Ray and finding the actor can take seconds (or time out):
        done on a daemon thread so the step loop never waits for it."""
        def run():
            try:
                hub = self._connect()
            except Exception as e:  # noqa: BLE001 - Ray down, bad address
                self._fail("connect", e)
                return
            with self._lock:
                if self._warned:
                    logger.info("vllm-spec-plugins: shared cache hub %r reachable again",
                                self.config.hub)
                    self._warned = False
                self._hub = hub

        self._connecting = threading.Thread(target=run, name="vsp-hub-connect", daemon=True)
        self._connecting.start()

    def _fail(self, what: str, err: BaseException) -> None:
        with self._lock:
            self._fail_locked(what, err)

    def _fail_locked(self, what: str, err: BaseException) -> None:
        self.stats["sync_errors"] += 1
        self._hub = None
        self._pending_pull = None
        self._retry_at = self._clock() + self.config.retry_s
        if not self._warned:
            logger.warning("vllm-spec-plugins: shared cache hub %r unreachable (%s: %s); this "
                           "replica keeps drafting from its local cache and retries every "
                           "%.0f s", self.config.hub, what, err, self.config.retry_s)
            self._warned = True

    def start(self) -> None:
        """Begin connecting now (in the background) rather than on the first
        step: joining Ray from an engine process takes seconds, and a replica
        whose first requests finish before it is connected would hold what
        they taught until its next request (an idle engine runs no steps)."""
        with self._lock:
            if self._hub is None and not self._connect_running():
                self._connect_in_background()

    def _connect_running(self) -> bool:
        return self._connecting is not None and self._connecting.is_alive()

    # -- the step hook -----------------------------------------------------
    def tick(self, export, force: bool = False) -> list[Any]:
        """Called every step: returns payloads pulled from other replicas (to
        import now). Every ``interval_s`` (or when ``force``), pushes
        ``export()`` (if not None) and starts the next pull. Never blocks:
        connecting happens on a background thread."""
        with self._lock:
            return self._tick_locked(export, force)

    def _tick_locked(self, export, force: bool) -> list[Any]:
        now = self._clock()
        got: list[Any] = []
        if self._pending_pull is not None:
            got = self._collect()
        if self._hub is None:
            if not self._connect_running() and now >= self._retry_at:
                self._connect_in_background()
            return got
        if not force and now - self._last_sync < self.config.interval_s:
            return got
        self._last_sync = now
        try:
            payload = export()
            if payload is not None:
                self._hub.push.remote(self.replica, payload)
                self.stats["pushed"] += 1
            if self._pending_pull is None:
                self._pending_pull = self._hub.pull.remote(self.replica, self._since)
        except Exception as e:  # noqa: BLE001 - actor dead, bad payload
            self._fail("push", e)
        return got

    def _collect(self) -> list[Any]:
        with self._lock:
            return self._collect_locked()

    def _collect_locked(self) -> list[Any]:
        import ray

        ref = self._pending_pull
        if ref is None:
            return []
        try:
            ready, _ = ray.wait([ref], timeout=0)
            if not ready:
                return []
            self._pending_pull = None
            latest, payloads = ray.get(ref)
        except Exception as e:  # noqa: BLE001
            self._fail("pull", e)
            return []
        self._since = max(self._since, int(latest))
        self.stats["pulled"] += len(payloads)
        return payloads

    def flush(self, export, timeout_s: float = 5.0) -> list[Any]:
        """Connect if needed, push now and wait (up to ``timeout_s``) for a
        pull: for tests and shutdown, never called from the step loop."""
        deadline = self._clock() + timeout_s
        got = self.tick(export, force=True)
        while self._hub is None and self._clock() < deadline:
            if not self._connect_running():
                if self._hub is None and self.stats["sync_errors"]:
                    return got  # the connection attempt failed
            time.sleep(0.05)
        if self._hub is not None:
            got += self.tick(export, force=True)
        while self._pending_pull is not None and self._clock() < deadline:
            time.sleep(0.05)
            got += self._collect()
        return got
