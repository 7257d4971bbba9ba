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

The model reads at most the last ``max_context`` tokens of a request: a
window that starts there and slides forward (read again from the last
``max_context`` tokens) once it has grown to twice that. A draft model
mostly needs the recent text, and a long prompt's full read would cost more
than the drafts it improves; the cheaper levels still see everything.

A finished request's cache is kept (a few, under the same bound) so that a
new request whose prompt starts with its tokens (the next turn of a chat, a
shared system prompt) copies that prefix instead of reading it again: a
draft model's prompt read is most of what it costs on short requests.

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
#: Finished requests' caches kept for prefix reuse (LRU), and the shortest
#: shared prefix worth copying.
MAX_DONORS = 16
MIN_SHARED_PREFIX = 16
#: A forward running at least this many tokens is a *read* (a prompt, a
#: catch-up): its time per token is what ``read_seconds_per_token`` tracks.
READ_MIN_TOKENS = 32
READ_TIME_EMA = 0.2


class LMState:
    """One request's KV cache and the tokens it holds."""

    __slots__ = ("tokens", "cache", "key", "offset")

    def __init__(self, key: int) -> None:
        self.tokens: np.ndarray = np.zeros(0, np.int64)  # what the cache holds (the window)
        self.cache: Any = None
        self.key = key
        self.offset = 0  # where the window starts in the request's sequence


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if len(diff) else n


def _run_start(state: LMState, seq: np.ndarray, n_out: int) -> int:
    """Where a forward of ``seq`` starts running: after the prefix the cache
    shares with it, but the last ``n_out`` positions always run; 0 = a
    fresh read (no cache)."""
    if state.cache is None:
        return 0
    n = max(1, min(int(n_out), len(seq)))
    return max(0, min(common_prefix(state.tokens, seq), len(seq) - n))


class CausalLMDrafter:
    """A Hugging Face causal LM with per-request KV caches (see module note)."""

    def __init__(self, path: str, dtype: str = "float32", num_layers: Optional[int] = None,
                 max_cached_tokens: int = 262144, device: str = "auto",
                 cpu_packing: str = "none", max_context: Optional[int] = None) -> None:
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
        self.max_context = None if max_context is None else max(16, int(max_context))
        self._live: "OrderedDict[int, LMState]" = OrderedDict()  # LRU order
        self._lock = threading.Lock()  # the LRU table (start_request may run off-thread)
        self._pinned: set[int] = set()  # states in a forward right now: never evicted
        self._donors: "OrderedDict[int, LMState]" = OrderedDict()  # finished, kept for reuse
        self._next_key = 0
        self.stats = {"forwards": 0, "forward_tokens": 0, "forward_seconds": 0.0,
                      "evictions": 0, "cached_tokens": 0, "kept_tokens": 0,
                      "reused_prefix_tokens": 0, "reads": 0, "read_tokens": 0, "read_seconds": 0.0}
        #: Measured seconds per token of a long forward (None until one ran).
        self.read_seconds_per_token: Optional[float] = None

    # ----------------------------------------------------------- states
    def new_state(self) -> LMState:
        with self._lock:
            self._next_key += 1
            st = LMState(self._next_key)
            self._live[st.key] = st
        return st

    def release(self, state: Optional[LMState], keep: bool = False) -> None:
        """The request is done with ``state``. ``keep``: its cache may serve
        a later prompt that starts with the same tokens (see module note)."""
        if state is None:
            return
        with self._lock:
            if keep and state.cache is not None and len(state.tokens) >= MIN_SHARED_PREFIX:
                self._donors[state.key] = state
                self._live.move_to_end(state.key)
                while len(self._donors) > MAX_DONORS:
                    _, old = self._donors.popitem(last=False)
                    self._drop(old)
            else:
                self._donors.pop(state.key, None)
                self._drop(state)
            self._count()

    def _drop(self, state: LMState) -> None:  # under the lock
        self._live.pop(state.key, None)
        state.cache, state.tokens = None, state.tokens[:0]

    def reuse_prefix(self, state: LMState, seq: np.ndarray) -> int:
        """Before ``state``'s first forward: copy the longest prefix of
        ``seq`` that a kept finished request's cache holds (at least
        MIN_SHARED_PREFIX tokens). Returns the tokens copied."""
        seq = np.asarray(seq, dtype=np.int64)
        if self.max_context is not None and len(seq) > self.max_context:
            return 0  # its window will not start at the sequence's start
        best, best_n = None, 0
        with self._lock:
            for d in self._donors.values():
                if d.offset:
                    continue
                n = common_prefix(d.tokens, seq)
                if n > best_n and d.cache is not None:
                    best, best_n = d, n
            if best is None or best_n < MIN_SHARED_PREFIX:
                return 0
            self._donors.move_to_end(best.key)
            self._live.move_to_end(best.key)
            layers = [(layer.keys, layer.values) for layer in best.cache.layers]
        # leave at least the last token to run: a forward needs an input
        n = min(best_n, len(seq) - 1)
        if n < MIN_SHARED_PREFIX:
            return 0
        self._make_room(state, n)
        state.cache = self._new_cache([(k[:, :, :n].clone(), v[:, :, :n].clone())
                                       for k, v in layers])
        state.tokens, state.offset = seq[:n], 0
        self.stats["reused_prefix_tokens"] += n
        return n

    def _count(self) -> None:  # under the lock
        """cached_tokens: live requests' caches; kept_tokens: finished ones
        kept for prefix reuse. max_cached_tokens bounds both together."""
        kept = sum(len(s.tokens) for s in self._donors.values())
        self.stats["kept_tokens"] = kept
        self.stats["cached_tokens"] = sum(len(s.tokens) for s in self._live.values()) - kept

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
                if self._donors.pop(key, None) is not None:
                    self._drop(s)  # a kept finished request: nothing re-reads it
                else:
                    s.cache, s.tokens = None, s.tokens[:0]
                self.stats["evictions"] += 1
            self._count()

    # ----------------------------------------------------------- forward
    def pending_tokens(self, state: LMState, seq: np.ndarray, n_out: int) -> int:
        """How many tokens :meth:`predict` of ``seq`` would run for ``state``
        now (the same window and cache rules, nothing changed): what a pass
        costs beyond its own few tokens when the cache lags behind."""
        moved = self._window_move(state, len(seq), n_out)
        if moved is not None:
            return len(seq) - moved  # a new window: read from its start
        q = np.asarray(seq[state.offset:], dtype=np.int64)
        return len(q) - _run_start(state, q, n_out)

    def _timed_read(self, tokens: int, seconds: float) -> None:
        if tokens >= READ_MIN_TOKENS:
            self.stats["reads"] += 1
            self.stats["read_tokens"] += tokens
            self.stats["read_seconds"] += seconds
            per = seconds / tokens
            r = self.read_seconds_per_token
            self.read_seconds_per_token = per if r is None else r + READ_TIME_EMA * (per - r)

    def predict(self, state: LMState, seq: np.ndarray, n_out: int
                ) -> tuple[np.ndarray, np.ndarray]:
        """The model's greedy next token and its probability after each of
        the last ``n_out`` prefixes of ``seq`` (``seq[:len-n_out+1]`` ...
        ``seq``), and the cache left holding ``seq``."""
        seq = self._window(state, np.asarray(seq, dtype=np.int64), n_out)
        with self._pinning([state]):
            return self._predict(state, seq, n_out)

    def _window(self, state: LMState, seq: np.ndarray, n_out: int) -> np.ndarray:
        """The part of ``seq`` the model reads (see module note). Moving the
        window's start drops the cache: positions are counted from it."""
        moved = self._window_move(state, len(seq), n_out)
        if moved is not None:
            state.offset = moved
            state.cache, state.tokens = None, state.tokens[:0]
        return seq[state.offset:]

    def _window_move(self, state: LMState, seq_len: int, n_out: int) -> Optional[int]:
        """The window's new start if reading ``seq_len`` tokens moves it, else None."""
        W = self.max_context
        if W is None:
            return None
        off = state.offset
        if (seq_len - off > 2 * W or seq_len - off <= n_out
                or (state.cache is None and seq_len - off > W)):
            new = max(0, seq_len - W)
            if new != off:
                return new
        return None

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
        start = _run_start(state, seq, n_out)
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
        with self._lock:
            self._count()
        st = self.stats
        dt = time.perf_counter() - t0
        st["forwards"] += 1
        st["forward_tokens"] += L - start
        st["forward_seconds"] += dt
        self._timed_read(L - start, dt)
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
        seqs = [self._window(st, np.asarray(q, dtype=np.int64), n)
                for st, q, n in zip(states, seqs, n_outs)]
        outs: list = [None] * len(states)
        rows = []  # (index, kept prefix length, n_out)
        for i, (st, q, n) in enumerate(zip(states, seqs, n_outs)):
            n = max(1, min(int(n), len(q)))
            start = _run_start(st, q, n)
            if start == 0 or len(q) - start >= READ_MIN_TOKENS:
                # a prefill or a long catch-up: its own pass, so the other
                # rows are not padded to its length
                outs[i] = self._predict(st, q, n)
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
        with self._lock:
            self._count()
        st = self.stats
        dt = time.perf_counter() - t0
        ran = sum(len(seqs[i]) - start for i, start, _ in rows)
        st["forwards"] += 1
        st["batched_forwards"] = st.get("batched_forwards", 0) + 1
        st["forward_tokens"] += ran
        st["forward_seconds"] += dt  # no read here: reads run alone (above)
        return outs

    def _new_cache(self, layers):
        from transformers import DynamicCache

        return DynamicCache(ddp_cache_data=layers)

    def warmup(self) -> None:
        """Small forwards before serving: allocations and kernel choices, and
        a first measure of what reading costs per token (the second read: the
        first pays one-off set-up)."""
        st = self.new_state()
        try:
            self.predict(st, np.arange(1, 9, dtype=np.int64) % self.vocab_size, 2)
            for _ in range(2):
                st.cache, st.tokens = None, st.tokens[:0]
                self.read_seconds_per_token = None
                self.predict(st, np.arange(1, 2 * READ_MIN_TOKENS + 1, dtype=np.int64)
                             % self.vocab_size, 1)
        finally:
            self.release(st)
