"""The one interface every proposer implements. Plain Python: no vLLM imports.

The vLLM integration layer (``vllm_spec_plugins.integration``) owns the request
lifecycle and calls these hooks; proposers only see request ids and token ids.
"""

from __future__ import annotations

import abc
import os
import tempfile
from typing import Optional, Sequence

import numpy as np


def save_npz_atomic(path: str, prefix: str, **arrays: np.ndarray) -> None:
    """Write ``arrays`` as one .npz at ``path`` atomically (temp file in the same
    directory, fsync, replace), so a crash never leaves a half-written state file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=d)
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

    Lifecycle, per request id (all calls from one thread, the model runner's):
      on_request_start(req_id, prompt)       once, before the first propose
      on_tokens(req_id, new_tokens)          every step, tokens appended since last call
      propose_batch([...])                   every decode step
      on_request_finish(req_id, aborted)     once: finished, aborted or evicted
    A request id may be reused after it finished (vLLM resubmits aborted ids):
    the integration layer always calls finish before a second start.
    """

    @abc.abstractmethod
    def on_request_start(self, req_id: str, prompt_token_ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def on_tokens(self, req_id: str, new_token_ids: np.ndarray) -> None: ...

    @abc.abstractmethod
    def propose(self, req_id: str, context: np.ndarray, max_tokens: int) -> list[int]:
        """Return at most ``max_tokens`` draft tokens that continue ``context``.

        ``context`` is prompt + output so far (read-only view, int32)."""

    def propose_batch(
        self, batch: Sequence[tuple[str, np.ndarray, int]]
    ) -> list[list[int]]:
        """Default: one ``propose`` per row. Override to vectorise."""
        return [self.propose(r, ctx, k) for r, ctx, k in batch]

    @abc.abstractmethod
    def on_request_finish(self, req_id: str, aborted: bool = False) -> None: ...

    # Optional: the target model's own top-k candidates at verified positions.
    #: Width of the top-k this proposer wants from the target (0 = none). When
    #: > 0, the integration layer takes the top-k of the logits the target has
    #: already computed (no extra forward pass) and calls on_target_topk.
    target_topk: int = 0

    def on_target_topk(self, req_id: str, input_token_ids: np.ndarray,
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

    def num_active_requests(self) -> int:
        """How many requests hold per-request state (tests check it returns to 0)."""
        return 0
