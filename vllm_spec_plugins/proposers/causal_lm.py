"""A small causal LM used as a drafter, with one KV cache per request.

The cascade's draft-model level (cascade.py) asks one thing of it: the
model's greedy next token (and its probability) after each of the last few
prefixes of a sequence, in one forward pass. The sequence is the request's
context plus a proposal being checked; the cache keeps the KV of the last
sequence seen, and a call first cuts it back to the longest prefix shared
with the new one (tokens the target rejected, or a proposal that was not
taken), so each step only runs the tokens that are new to the model.

Memory is bounded: the caches of all requests hold at most
``max_cached_tokens`` tokens; past that the least recently used request
gives its cache up and re-reads its context the next time it drafts.

Torch and transformers are imported when a model is loaded, never from vLLM.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from typing import Any, Optional

import numpy as np

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class LMState:
    """One request's KV cache and the tokens it holds."""

    __slots__ = ("tokens", "cache", "key")

    def __init__(self, key: int) -> None:
        self.tokens: np.ndarray = np.zeros(0, np.int64)
        self.cache: Any = None
        self.key = key


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


class CausalLMDrafter:
    """A Hugging Face causal LM with per-request KV caches (see module note)."""

    def __init__(self, path: str, dtype: str = "float32", num_layers: Optional[int] = None,
                 max_cached_tokens: int = 262144, device: str = "auto",
                 cpu_packing: str = "none") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self._torch = torch
        if device == "auto":
            # The worker's own GPU (vLLM sets the current device per worker).
            device = (f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available()
                      else "cpu")
        self.device = torch.device(device)
        torch_dtype = getattr(torch, _DTYPES[dtype])
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(self.device)
        layers = model.model.layers
        if num_layers is not None:
            if num_layers > len(layers):
                raise ValueError(f"num_layers={num_layers} but {path} has {len(layers)} layers")
            model.model.layers = layers[:num_layers]
            model.config.num_hidden_layers = num_layers
            if getattr(model.config, "layer_types", None):
                model.config.layer_types = model.config.layer_types[:num_layers]
        model.eval()
        self.packing = "none"
        if cpu_packing != "none" and self.device.type == "cpu" and torch_dtype == torch.float32:
            from .packed_linear import pack_linears

            model, packed = pack_linears(model, cpu_packing)
            self.packing = cpu_packing if packed else "none"
        self.model = model
        self.path = path
        self.num_layers = len(model.model.layers)
        self.vocab_size = int(model.config.vocab_size)
        self.max_cached_tokens = int(max_cached_tokens)
        self._live: "OrderedDict[int, LMState]" = OrderedDict()  # LRU order
        self._lock = threading.Lock()  # the LRU table (start_request may run off-thread)
        self._pinned: set[int] = set()  # states in a forward right now: never evicted
        self._next_key = 0
        self.stats = {"forwards": 0, "forward_tokens": 0, "forward_seconds": 0.0,
                      "evictions": 0, "cached_tokens": 0}

    # ----------------------------------------------------------- states
    def new_state(self) -> LMState:
        with self._lock:
            self._next_key += 1
            st = LMState(self._next_key)
            self._live[st.key] = st
        return st

    def release(self, state: Optional[LMState]) -> None:
        if state is None:
            return
        with self._lock:
            self._live.pop(state.key, None)
            state.cache, state.tokens = None, state.tokens[:0]
            self._count()

    def _count(self) -> None:
        self.stats["cached_tokens"] = sum(len(s.tokens) for s in self._live.values())

    def _make_room(self, state: LMState, extra: int) -> None:
        """Evict least recently used caches (not ``state``'s) until ``extra``
        more tokens fit under the bound."""
        with self._lock:
            self._live.move_to_end(state.key)
            total = sum(len(s.tokens) for s in self._live.values())
            for key in list(self._live):
                if total + extra <= self.max_cached_tokens:
                    break
                s = self._live[key]
                if s is state or s.cache is None or key in self._pinned:
                    continue
                total -= len(s.tokens)
                s.cache, s.tokens = None, s.tokens[:0]
                self.stats["evictions"] += 1
            self.stats["cached_tokens"] = total + extra

    # ----------------------------------------------------------- forward
    def predict(self, state: LMState, seq: np.ndarray, n_out: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """The model's greedy next token and its probability after each of
        the last ``n_out`` prefixes of ``seq`` (``seq[:len-n_out+1]`` ...
        ``seq``), and the cache left holding ``seq``."""
        seq = np.asarray(seq, dtype=np.int64)
        with self._pinning([state]):
            return self._predict(state, seq, n_out)

    def _pinning(self, states):
        """While a forward uses these states, another thread's eviction skips them."""
        @contextlib.contextmanager
        def pinned():
            keys = {s.key for s in states}
            with self._lock:
                self._pinned |= keys
            try:
                yield
            finally:
                with self._lock:
                    self._pinned -= keys
        return pinned()

    def _predict(self, state: LMState, seq: np.ndarray, n_out: int
                 ) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        L = len(seq)
        n_out = max(1, min(int(n_out), L))
        keep = common_prefix(state.tokens, seq) if state.cache is not None else 0
        start = min(keep, L - n_out)  # the last n_out positions must be run
        self._make_room(state, L - start)
        t0 = time.perf_counter()
        with torch.inference_mode():
            if state.cache is None or start == 0:
                from transformers import DynamicCache

                state.cache = DynamicCache(config=self.model.config)
                start = 0
            elif len(state.tokens) > start:
                state.cache.crop(start - len(state.tokens))  # negative: drop that many
            ids = torch.from_numpy(seq[start:]).unsqueeze(0).to(self.device)
            out = self.model(input_ids=ids, past_key_values=state.cache, use_cache=True,
                             logits_to_keep=n_out)
            logits = out.logits[0, -n_out:].float()
            probs = torch.softmax(logits, dim=-1)
            top_p, top_i = probs.max(dim=-1)
        state.cache = out.past_key_values
        state.tokens = seq
        st = self.stats
        st["forwards"] += 1
        st["forward_tokens"] += L - start
        st["forward_seconds"] += time.perf_counter() - t0
        return top_i.cpu().numpy().astype(np.int64), top_p.cpu().numpy().astype(np.float64)

    def predict_batch(self, states: list[LMState], seqs: list[np.ndarray], n_outs: list[int]
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
        """:meth:`predict` for several requests in one forward pass (a small
        model on a CPU or GPU reads its weights once for all rows).

        Each row's cached KV is cut back to what it shares with its new
        sequence and laid out left-padded in one batch cache; the new tokens
        follow, right-padded, with per-row positions and a padding mask. The
        rows' new KV is then cut out of the batch cache into their own. Rows
        that need a fresh start (no cache) are run one by one first."""
        if len(states) == 1:
            return [self.predict(states[0], seqs[0], n_outs[0])]
        with self._pinning(states):
            return self._predict_batch(states, seqs, n_outs)

    def _predict_batch(self, states, seqs, n_outs):
        torch = self._torch
        seqs = [np.asarray(q, dtype=np.int64) for q in seqs]
        outs: list = [None] * len(states)
        rows = []  # (index, kept prefix length, n_out)
        for i, (st, q, n) in enumerate(zip(states, seqs, n_outs)):
            n = max(1, min(int(n), len(q)))
            keep = common_prefix(st.tokens, q) if st.cache is not None else 0
            start = min(keep, len(q) - n)
            if st.cache is None or start == 0:
                outs[i] = self._predict(st, q, n)  # a full prefill: its own pass
            else:
                rows.append((i, start, n))
        if len(rows) == 1:
            i, _, n = rows[0]
            outs[i] = self._predict(states[i], seqs[i], n)
            rows = []
        if not rows:
            return outs
        for i, start, _ in rows:
            self._make_room(states[i], len(seqs[i]) - start)
        t0 = time.perf_counter()
        B = len(rows)
        P = max(start for _, start, _ in rows)
        N = max(len(seqs[i]) - start for i, start, _ in rows)
        with torch.inference_mode():
            n_layers = len(states[rows[0][0]].cache.layers)
            layers = []
            for li in range(n_layers):
                k0 = states[rows[0][0]].cache.layers[li].keys
                shape = (B, k0.shape[1], P, k0.shape[3])
                ks = k0.new_zeros(shape)
                vs = k0.new_zeros(shape)
                for b, (i, start, _) in enumerate(rows):
                    layer = states[i].cache.layers[li]
                    ks[b, :, P - start:] = layer.keys[0, :, :start]
                    vs[b, :, P - start:] = layer.values[0, :, :start]
                layers.append((ks, vs))
            cache = self._new_cache(layers)
            ids = torch.zeros((B, N), dtype=torch.long)
            pos = torch.zeros((B, N), dtype=torch.long)
            mask = torch.zeros((B, P + N), dtype=torch.long)
            for b, (i, start, _) in enumerate(rows):
                new = seqs[i][start:]
                ids[b, :len(new)] = torch.from_numpy(new)
                pos[b] = start + torch.arange(N)
                mask[b, P - start:P + len(new)] = 1
            dev = self.device
            out = self.model(input_ids=ids.to(dev), position_ids=pos.to(dev),
                             attention_mask=mask.to(dev), past_key_values=cache, use_cache=True)
            logits = out.logits
            for b, (i, start, n) in enumerate(rows):
                m = len(seqs[i]) - start
                probs = torch.softmax(logits[b, m - n:m].float(), dim=-1)
                top_p, top_i = probs.max(dim=-1)
                outs[i] = (top_i.cpu().numpy().astype(np.int64),
                           top_p.cpu().numpy().astype(np.float64))
                # the row's own cache: what it kept, then its new tokens' KV
                mine = []
                for li in range(n_layers):
                    layer = out.past_key_values.layers[li]
                    old = states[i].cache.layers[li]
                    mine.append((torch.cat([old.keys[:, :, :start], layer.keys[b:b + 1, :, P:P + m]],
                                           dim=2),
                                 torch.cat([old.values[:, :, :start],
                                            layer.values[b:b + 1, :, P:P + m]], dim=2)))
                states[i].cache = self._new_cache(mine)
                states[i].tokens = seqs[i]
        st = self.stats
        st["forwards"] += 1
        st["batched_forwards"] = st.get("batched_forwards", 0) + 1
        st["forward_tokens"] += sum(len(seqs[i]) - start for i, start, _ in rows)
        st["forward_seconds"] += time.perf_counter() - t0
        return outs

    def _new_cache(self, layers):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers)

    def warmup(self) -> None:
        """One small forward: allocations and kernel choices before serving."""
        st = self.new_state()
        try:
            self.predict(st, np.arange(1, 9, dtype=np.int64) % self.vocab_size, 2)
        finally:
            self.release(st)
