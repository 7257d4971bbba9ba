"""The one interface every proposer implements. Plain Python: no vLLM imports.

The integration layer (``vllm_spec_plugins.integration``) owns the request
lifecycle: its request table is the one place that knows which requests are
live. A proposer keeps no per-request registry of its own: ``start_request``
returns the request's state, the table keeps it, and every later hook gets it
back.
"""

from __future__ import annotations

import abc
import glob
import os
import tempfile
import time
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

#: What ``Proposer.start_request`` returned for a request (opaque to the
#: integration layer; may be None for a proposer with no per-request state).
RequestState = Any


class ScoredDraft(NamedTuple):
    """A draft with the proposer's estimate of how likely each token is accepted.

    ``probs[i]``: the estimated probability that token ``i`` is accepted given
    that tokens ``0..i-1`` were (a conditional, in (0, 1]); None = no estimate.
    ``stratum``: a small int (0..63) naming the kind of evidence behind the
    estimate (e.g. the suffix tree's match length), so that the draft budget
    (integration/draft_budget.py) calibrates each kind on its own.
    """

    tokens: list[int]
    probs: Optional[list[float]] = None
    stratum: int = 0


#: A temp file of an interrupted save older than this is removed by the next save.
STALE_TEMP_AGE_S = 3600.0


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)}.{os.getpid()}."


def remove_stale_temps(path: str, max_age_s: float = STALE_TEMP_AGE_S) -> list[str]:
    """Remove temp files that an interrupted save of ``path`` left behind: those of
    a process that no longer runs, or older than ``max_age_s``. Returns what it removed."""
    d = os.path.dirname(os.path.abspath(path))
    removed = []
    now = time.time()
    for tmp in glob.glob(os.path.join(d, f".{glob.escape(os.path.basename(path))}.*.tmp")):
        try:
            pid = int(os.path.basename(tmp)[len(os.path.basename(path)) + 2:].split(".", 1)[0])
        except ValueError:
            pid = -1
        try:
            alive = pid > 0 and pid != os.getpid() and pid_alive(pid)
            if pid == os.getpid() or (alive and now - os.path.getmtime(tmp) < max_age_s):
                continue
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as one .npz at ``path`` atomically (temp file in the same
    directory, fsync, replace), so a crash never leaves a half-written state file.
    The temp file is named after ``path`` and this process id, so the next save
    (of any process) removes one that a killed process left behind."""
    remove_stale_temps(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Proposer(abc.ABC):
    """Drafts token chains for running requests.

    Lifecycle of one request (the integration layer calls these):
      state = start_request(req_id, prompt)   once, before the first propose
      on_target_topk(state, ...)              each step, if target_topk > 0
      on_tokens(state, new_tokens)            each step: tokens appended since last call
      propose_batch([(state, context, k)])    each decode step
      finish_request(state, aborted)          once: finished, aborted or evicted

    Threads: ``start_request`` may run on the integration layer's background
    thread (long prompts are prepared off the engine step) while the step thread
    drafts for other requests, so it must only build and return the new state,
    touching nothing shared with other requests. Every other hook runs on the
    step thread. Save/load and import_shared run with the step's drafting
    paused (the integration layer holds the proposer lock).
    """

    @abc.abstractmethod
    def start_request(self, req_id: str, prompt_token_ids: np.ndarray) -> RequestState:
        """Build the per-request state from the prompt (see the class note on
        threads). ``req_id`` is for messages; do not keep a registry by it."""

    @abc.abstractmethod
    def on_tokens(self, state: RequestState, new_token_ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def propose(self, state: RequestState, context: np.ndarray, max_tokens: int) -> list[int]:
        """Return at most ``max_tokens`` draft tokens that continue ``context``.

        ``context`` is prompt + output so far (read-only view, int32)."""

    def propose_batch(
        self, batch: Sequence[tuple[RequestState, np.ndarray, int]]
    ) -> list[list[int]]:
        """Default: one ``propose`` per row. Override to vectorise."""
        return [self.propose(s, ctx, k) for s, ctx, k in batch]

    def propose_scored_batch(
        self, batch: Sequence[tuple[RequestState, np.ndarray, int]],
        price: Optional[float] = None,
    ) -> list[ScoredDraft]:
        """Drafts with per-token acceptance estimates, for the shared draft
        budget, which cuts each row where a token no longer pays for its
        verification. ``price``: what a drafted token must be worth this step
        (acceptance probability; None = not known), for a proposer that
        chooses among candidate drafts by it. Default: ``propose_batch`` with
        no estimates (the budget then learns this proposer's acceptance per
        position from what the engine accepts)."""
        if len(batch) == 1:  # the drafter's row-by-row retry after a failed batch
            return [ScoredDraft(list(self.propose(*batch[0])))]
        return [ScoredDraft(list(d)) for d in self.propose_batch(batch)]

    def finish_request(self, state: RequestState, aborted: bool = False) -> None:
        """The request finished (or was aborted): learn from it, release it."""

    # Optional: the target model's own top-k candidates at verified positions.
    #: Width of the top-k this proposer wants from the target (0 = none). When
    #: > 0, the integration layer takes the top-k of the logits the target has
    #: already computed (no extra forward pass) and calls on_target_topk.
    target_topk: int = 0

    def on_target_topk(self, state: RequestState, input_token_ids: np.ndarray,
                       topk_ids: np.ndarray, topk_probs: np.ndarray) -> None:
        """The target's candidates of this step, called before ``on_tokens``.

        Row ``j`` holds the target's ``target_topk`` most likely next tokens
        (``topk_ids`` int32 [n, k], best first) and their probabilities
        (``topk_probs`` float32 [n, k]) after input token ``input_token_ids[j]``.
        The inputs are the verification window of this step: the last token
        before the drafts, then the drafts (accepted or not); ``n`` = drafts + 1.
        Probabilities are of the raw model distribution (before temperature and
        other sampling settings)."""

    # Optional persistence of cross-request state (e.g. a global cache).
    def save(self, path: str) -> None:  # pragma: no cover - default no-op
        raise NotImplementedError(f"{type(self).__name__} has no state to save")

    def load(self, path: str) -> None:  # pragma: no cover - default no-op
        raise NotImplementedError(f"{type(self).__name__} has no state to load")

    def save_state(self) -> bool:
        """Save cross-request state to the path(s) its settings name, if any
        (the integration layer calls this periodically and at exit). Returns
        whether a path was configured."""
        return False

    # Optional: sharing cross-request state between replicas (sharing.py).
    def enable_sharing(self) -> None:
        """Start recording what ``export_shared`` will return (called once by
        the integration layer when sharing is configured; costs nothing when
        it is not)."""

    def export_shared(self) -> Optional[dict]:
        """What this proposer learnt since the last call, for other replicas
        (a picklable dict of numpy arrays/lists), or None if nothing."""
        return None

    def import_shared(self, payload: dict) -> None:
        """Merge a payload another replica exported (unknown keys ignored:
        replicas may run different methods)."""

    def set_step_cost(self, model) -> None:
        """The engine's measured verification cost (a ``StepCostModel``,
        step_cost.py), given once by the integration layer. A proposer that
        prices its draft tokens keeps it; the default ignores it."""

    def warmup(self) -> None:
        """Compile/prepare before serving (called once by the integration layer)."""

    def prometheus_counters(self) -> list[tuple[str, str, dict, float]]:
        """Counters of this proposer for the server's ``/metrics``: (name
        ending in ``_total``, help text, labels, value). Default: none."""
        return []
