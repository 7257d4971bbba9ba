"""What the target model computed this step, handed to proposers that ask.

Now: the top-k of the logits at every verified position (Token Recycling),
taken where vLLM's runner already has them (``_sample``), so no extra forward
pass. Next: the target's hidden states, for model drafters and scorers.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any, Optional

import numpy as np

logger = logging.getLogger("vllm_spec_plugins")

TopK = tuple[np.ndarray, np.ndarray, np.ndarray]  # (drafts, ids [n, k], probs [n, k])


class TargetTopK:
    """The target's top-k of this step's verified positions, by request id;
    rebuilt every step, so it never holds more than one step's batch."""

    def __init__(self, width: int) -> None:
        self.width = max(0, int(width))
        self._stash: dict[str, TopK] = {}
        self.seconds = 0.0
        self.rows = 0
        self.errors = 0

    def capture(self, req_ids: list, logits: Any, spec_decode_metadata: Any) -> None:
        """Logit rows: without drafts in the batch, one per request (its last
        token); with drafts, request i owns rows cu_num_sampled_tokens[i-1] ..
        cu_num_sampled_tokens[i]-1, one per draft then the bonus position.
        A failure disables the capture (drafting goes on without it)."""
        self._stash = {}
        if logits is None or self.width <= 0:
            return
        t0 = time.perf_counter()
        try:
            import torch

            k = min(self.width, int(logits.shape[-1]))
            with torch.no_grad():
                vals, ids = torch.topk(logits, k, dim=-1)
                lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
                probs = torch.exp(vals.float() - lse)
            ids_np = ids.to("cpu").numpy().astype(np.int32, copy=False)
            probs_np = probs.to("cpu").numpy().astype(np.float32, copy=False)
            stash: dict[str, TopK] = {}
            if spec_decode_metadata is None:
                if ids_np.shape[0] != len(req_ids):
                    return
                none = np.zeros(0, dtype=np.int32)
                for i, rid in enumerate(req_ids):
                    if rid is not None:
                        stash[rid] = (none, ids_np[i:i + 1], probs_np[i:i + 1])
            else:
                cu = spec_decode_metadata.cu_num_sampled_tokens.to("cpu").numpy()
                drafts = spec_decode_metadata.draft_token_ids.to("cpu").numpy().astype(np.int32)
                n_drafts = spec_decode_metadata.num_draft_tokens
                if len(n_drafts) != len(req_ids) or int(cu[-1]) != ids_np.shape[0]:
                    return
                d0 = 0
                for i, rid in enumerate(req_ids):
                    r0, r1, nd = (int(cu[i - 1]) if i else 0), int(cu[i]), int(n_drafts[i])
                    if rid is not None and r1 - r0 == nd + 1:
                        stash[rid] = (drafts[d0:d0 + nd], ids_np[r0:r1], probs_np[r0:r1])
                    d0 += nd
            self._stash = stash
            self.rows += int(ids_np.shape[0])
        except Exception:
            self.width = 0
            self.errors += 1
            logger.warning("vllm-spec-plugins: capturing the target's top-k failed; drafting "
                           "goes on without it:\n%s", traceback.format_exc())
        finally:
            self.seconds += time.perf_counter() - t0

    def take(self, req_id: str, context: np.ndarray, n: int, n_sampled: int
             ) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(input tokens of the verification window, top-k ids, probs) for a
        request whose context now has ``n`` tokens, ``n_sampled`` of them new."""
        cap = self._stash.pop(req_id, None)
        if cap is None:
            return None
        drafts, ids, probs = cap
        first = n - n_sampled - 1  # the token before this step's verification window
        if first < 0 or ids.shape[0] != drafts.shape[0] + 1:
            return None
        inputs = np.empty(drafts.shape[0] + 1, dtype=np.int32)
        inputs[0] = context[first]
        inputs[1:] = drafts
        return inputs, ids, probs

    def clear(self) -> None:
        self._stash = {}
