"""A masked-block drafter: one forward pass drafts a whole block of tokens.

The model is a few transformer layers taken from the target itself (its
embeddings, its LM head and some of its layers), trained by
``vllm-spec-plugins train-drafter`` (drafter_training.py) to fill a block of
masked positions after a context: the query block is

    [last context token, MASK, MASK, ..., MASK]      (``block_size`` queries)

at the positions that follow the context. The queries attend to the whole
context (causally encoded by the same layers, kept as a per-request KV cache)
and to each other in both directions (a masked-diffusion block, denoised in
one step). Output ``i`` of the block is the drafter's distribution for the
``i``-th token after the context: a token lattice, of which the proposer
(diffusion.py) extracts a path.

Only the context is cached: the block's own keys are never kept, so a
rejected draft needs no rollback; the cache always holds the context less its
last token (which opens the next block).

The LM head is cut to the ``draft_vocab`` most frequent tokens of the
training text (FR-Spec-style): drafting a token outside it would rarely pay,
and the head's cost falls with its size. Inputs keep the full vocabulary.

Plain torch (+ safetensors): no vLLM, no transformers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import numpy as np

from .causal_lm import common_prefix

#: File names of a drafter directory.
SPEC_FILE = "drafter.json"
WEIGHTS_FILE = "drafter.safetensors"
FORMAT = "vllm-spec-plugins/block-drafter/1"


class DrafterFormatError(ValueError):
    """A drafter directory that is missing, corrupt or of another format."""


@dataclass
class TargetInfo:
    """What the drafter was made for: checked against the serving target."""

    name: str
    architecture: str
    hidden_size: int
    vocab_size: int
    num_layers: int

    @classmethod
    def from_hf_config(cls, name: str, cfg: dict) -> "TargetInfo":
        return cls(name=name, architecture=(cfg.get("architectures") or ["?"])[0],
                   hidden_size=int(cfg["hidden_size"]), vocab_size=int(cfg["vocab_size"]),
                   num_layers=int(cfg["num_hidden_layers"]))

    def mismatches(self, other: "TargetInfo") -> list[str]:
        """Fields (hidden_size, vocab_size, num_layers, architecture) that differ."""
        return [f for f in ("architecture", "hidden_size", "vocab_size", "num_layers")
                if getattr(self, f) != getattr(other, f)]


@dataclass
class BlockDrafterSpec:
    """Shape and provenance of a drafter (``drafter.json``)."""

    target: TargetInfo
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    qkv_bias: bool
    layer_ids: list[int]
    block_size: int
    draft_vocab: list[int]
    training: dict = field(default_factory=dict)
    format: str = FORMAT

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "BlockDrafterSpec":
        d = dict(d)
        d["target"] = TargetInfo(**d["target"])
        return cls(**d)


def hf_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as f:
        return json.load(f)


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _target_tensors(model_dir: str, names: list[str]) -> dict:
    """The named tensors of a Hugging Face safetensors checkpoint (sharded or not)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise DrafterFormatError(f"{model_dir}: no .safetensors weights")
    out = {}
    for fn in files:
        with safe_open(os.path.join(model_dir, fn), "pt") as f:
            keys = set(f.keys())
            for n in names:
                if n in keys and n not in out:
                    out[n] = f.get_tensor(n)
    return out


def _torch():
    import torch

    return torch


def build_module(spec: BlockDrafterSpec):
    """The torch module of ``spec`` (weights uninitialised: load or copy them)."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    class RMSNorm(nn.Module):
        def __init__(self, n: int, eps: float) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))
            self.eps = eps

        def forward(self, x):
            v = x.pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(v + self.eps) * self.weight

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            H, hd = spec.hidden_size, spec.head_dim
            self.input_layernorm = RMSNorm(H, spec.rms_norm_eps)
            self.q_proj = nn.Linear(H, spec.num_heads * hd, bias=spec.qkv_bias)
            self.k_proj = nn.Linear(H, spec.num_kv_heads * hd, bias=spec.qkv_bias)
            self.v_proj = nn.Linear(H, spec.num_kv_heads * hd, bias=spec.qkv_bias)
            self.o_proj = nn.Linear(spec.num_heads * hd, H, bias=False)
            self.post_attention_layernorm = RMSNorm(H, spec.rms_norm_eps)
            self.gate_proj = nn.Linear(H, spec.intermediate_size, bias=False)
            self.up_proj = nn.Linear(H, spec.intermediate_size, bias=False)
            self.down_proj = nn.Linear(spec.intermediate_size, H, bias=False)

        def forward(self, x, cos, sin, mask, past_k=None, past_v=None):
            """x [B, Q, H]; mask bool [B, 1, Q, P+Q] (True = attend); past [B, kv, P, hd].
            Returns (x, k, v) with k, v the queries' own keys/values [B, kv, Q, hd]."""
            B, Q, _ = x.shape
            hd, nh, nkv = spec.head_dim, spec.num_heads, spec.num_kv_heads
            h = self.input_layernorm(x)
            q = self.q_proj(h).view(B, Q, nh, hd).transpose(1, 2)
            k = self.k_proj(h).view(B, Q, nkv, hd).transpose(1, 2)
            v = self.v_proj(h).view(B, Q, nkv, hd).transpose(1, 2)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            kk = k if past_k is None else torch.cat([past_k, k], dim=2)
            vv = v if past_v is None else torch.cat([past_v, v], dim=2)
            if nh != nkv:
                kk = kk.repeat_interleave(nh // nkv, dim=1)
                vv = vv.repeat_interleave(nh // nkv, dim=1)
            a = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask)
            x = x + self.o_proj(a.transpose(1, 2).reshape(B, Q, nh * hd))
            h = self.post_attention_layernorm(x)
            x = x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, k, v

    def _rotate(x, cos, sin):
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    class BlockDrafterModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            H = spec.hidden_size
            # Frozen: the target's own input embeddings and LM head rows.
            self.embed = nn.Parameter(torch.zeros(spec.target.vocab_size, H), requires_grad=False)
            self.head = nn.Parameter(torch.zeros(len(spec.draft_vocab), H), requires_grad=False)
            self.mask_embed = nn.Parameter(torch.zeros(H))
            self.layers = nn.ModuleList(Layer() for _ in spec.layer_ids)
            self.norm = RMSNorm(H, spec.rms_norm_eps)
            inv = 1.0 / (spec.rope_theta ** (torch.arange(0, spec.head_dim, 2).float()
                                            / spec.head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def rope(self, positions):
            """cos, sin [B, 1, Q, hd] for integer positions [B, Q]."""
            f = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq
            emb = torch.cat([f, f], dim=-1)[:, None]
            return emb.cos().to(self.mask_embed.dtype), emb.sin().to(self.mask_embed.dtype)

        def embed_inputs(self, ids, is_mask):
            x = F.embedding(ids.clamp(min=0), self.embed)
            return torch.where(is_mask[..., None], self.mask_embed.expand_as(x), x)

        def run(self, x, positions, mask, past=None):
            """All layers; ``past``: per layer (k, v) [B, kv, P, hd] or None.
            Returns (hidden after the final norm, per layer (k, v) of the queries)."""
            cos, sin = self.rope(positions)
            new = []
            for i, layer in enumerate(self.layers):
                pk, pv = past[i] if past is not None else (None, None)
                x, k, v = layer(x, cos, sin, mask, pk, pv)
                new.append((k, v))
            return self.norm(x), new

        def logits(self, h):
            return h @ self.head.t()

    return BlockDrafterModule()


def init_from_target(target_dir: str, target_name: str, layer_ids: list[int], block_size: int,
                     draft_vocab: list[int]):
    """A fresh drafter: the target's embeddings, LM head rows of ``draft_vocab``,
    final norm and layers ``layer_ids``; the mask embedding starts at the mean
    input embedding. Returns (spec, module)."""
    torch = _torch()
    cfg = hf_config(target_dir)
    n_layers = int(cfg["num_hidden_layers"])
    bad = [i for i in layer_ids if not 0 <= i < n_layers]
    if bad or not layer_ids:
        raise ValueError(f"layer ids {layer_ids} must be in 0..{n_layers - 1} "
                         f"({target_name} has {n_layers} layers)")
    nh = int(cfg["num_attention_heads"])
    hd = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // nh)
    names = ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]
    parts = ["input_layernorm.weight", "post_attention_layernorm.weight",
             "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "self_attn.q_proj.bias", "self_attn.k_proj.bias",
             "self_attn.v_proj.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight",
             "mlp.down_proj.weight"]
    for i in layer_ids:
        names += [f"model.layers.{i}.{p}" for p in parts]
    w = _target_tensors(target_dir, names)
    spec = BlockDrafterSpec(
        target=TargetInfo.from_hf_config(target_name, cfg),
        hidden_size=int(cfg["hidden_size"]), num_heads=nh,
        num_kv_heads=int(cfg.get("num_key_value_heads") or nh), head_dim=hd,
        intermediate_size=int(cfg["intermediate_size"]),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)), rope_theta=_rope_theta(cfg),
        qkv_bias=f"model.layers.{layer_ids[0]}.self_attn.q_proj.bias" in w,
        layer_ids=list(layer_ids), block_size=int(block_size),
        draft_vocab=[int(t) for t in draft_vocab])
    module = build_module(spec)
    f32 = torch.float32
    with torch.no_grad():
        emb = w["model.embed_tokens.weight"].to(f32)
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"]).to(f32)
        module.embed.copy_(emb)
        module.head.copy_(head[torch.as_tensor(spec.draft_vocab, dtype=torch.long)])
        module.mask_embed.copy_(emb.mean(0))
        module.norm.weight.copy_(w["model.norm.weight"].to(f32))
        for layer, i in zip(module.layers, layer_ids):
            p = f"model.layers.{i}."
            layer.input_layernorm.weight.copy_(w[p + "input_layernorm.weight"].to(f32))
            layer.post_attention_layernorm.weight.copy_(
                w[p + "post_attention_layernorm.weight"].to(f32))
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer, proj).weight.copy_(w[f"{p}self_attn.{proj}.weight"].to(f32))
                b = w.get(f"{p}self_attn.{proj}.bias")
                if b is not None and getattr(layer, proj).bias is not None:
                    getattr(layer, proj).bias.copy_(b.to(f32))
            for proj in ("gate_proj", "up_proj", "down_proj"):
                getattr(layer, proj).weight.copy_(w[f"{p}mlp.{proj}.weight"].to(f32))
    return spec, module


def save_drafter(out_dir: str, spec: BlockDrafterSpec, module) -> None:
    """Write ``drafter.json`` and ``drafter.safetensors`` (each atomically)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    tmp = os.path.join(out_dir, f".{WEIGHTS_FILE}.{os.getpid()}.tmp")
    save_file(state, tmp)
    os.replace(tmp, os.path.join(out_dir, WEIGHTS_FILE))
    tmp = os.path.join(out_dir, f".{SPEC_FILE}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(spec.to_json(), f, indent=1)
    os.replace(tmp, os.path.join(out_dir, SPEC_FILE))


def read_spec(path: str) -> BlockDrafterSpec:
    """The spec of the drafter directory ``path``; DrafterFormatError saying
    what is wrong and how to get one otherwise."""
    f = os.path.join(os.path.expanduser(path), SPEC_FILE)
    how = "make one with `vllm-spec-plugins train-drafter --target MODEL --out DIR`"
    if not os.path.isfile(f):
        raise DrafterFormatError(f"{path!r} is not a drafter directory (no {SPEC_FILE}); {how}")
    try:
        with open(f) as fh:
            d = json.load(fh)
        spec = BlockDrafterSpec.from_json(d)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DrafterFormatError(f"{f}: unreadable drafter spec ({e}); {how}") from None
    if spec.format != FORMAT:
        raise DrafterFormatError(f"{f}: format {spec.format!r}, this version reads {FORMAT!r}")
    if not os.path.isfile(os.path.join(os.path.expanduser(path), WEIGHTS_FILE)):
        raise DrafterFormatError(f"{path!r}: {WEIGHTS_FILE} is missing; {how}")
    return spec


def resolve_dtype(dtype: str) -> str:
    """``auto``: bfloat16 where the CPU has native bf16 arithmetic, else float32."""
    if dtype != "auto":
        return dtype
    torch = _torch()
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        native = False
    return "bfloat16" if native else "float32"


def load_drafter(path: str, dtype: str = "float32"):
    """(spec, module in eval mode) of a saved drafter directory."""
    torch = _torch()
    dtype = resolve_dtype(dtype)
    from safetensors.torch import load_file

    spec = read_spec(path)
    module = build_module(spec)
    try:
        state = load_file(os.path.join(os.path.expanduser(path), WEIGHTS_FILE))
        module.load_state_dict(state, strict=False)
        missing = [k for k in module.state_dict() if k not in state]
    except Exception as e:  # truncated or foreign file
        raise DrafterFormatError(f"{path!r}: unreadable {WEIGHTS_FILE} ({e})") from None
    if missing:
        raise DrafterFormatError(f"{path!r}: {WEIGHTS_FILE} lacks {missing[:3]}")
    module = module.to(getattr(torch, dtype)).eval()
    return spec, module


# ------------------------------------------------------------------ masks
def training_mask(lengths, cuts, S: int, K: int, block_lens=None):
    """Attention mask for training on packed blocks (see ``train_inputs``):
    bool [B, 1, S + J*K, S + J*K]. Context rows are causal over the valid
    context; block ``j``'s rows see context positions < cut and the first
    ``block_lens[b, j]`` positions of their own block (default all K: a
    shorter block is what inference runs when it needs fewer tokens)."""
    torch = _torch()
    B, J = cuts.shape
    L = S + J * K
    m = torch.zeros(B, L, L, dtype=torch.bool)
    ar = torch.arange(S)
    causal = ar[None, :] <= ar[:, None]
    for b in range(B):
        valid = ar < int(lengths[b])
        m[b, :S, :S] = causal & valid[None, :]
        for j in range(J):
            r0 = S + j * K
            n = K if block_lens is None else int(block_lens[b, j])
            m[b, r0:r0 + n, :S] = (ar < int(cuts[b, j]))[None, :]
            m[b, r0:r0 + n, r0:r0 + n] = True
    # rows that see nothing else (padding, positions past a short block): themselves
    idx = torch.arange(L)
    m[:, idx, idx] = True
    return m[:, None]


def train_inputs(tokens, lengths, cuts, K: int, block_lens=None):
    """Inputs of one packed training batch.

    ``tokens`` int64 [B, S] (context, right-padded), ``lengths`` [B],
    ``cuts`` [B, J]: block ``j`` opens at position ``cuts[b, j]`` (its first
    query is that context token, then K-1 masks) and predicts the K tokens
    after it (the first ``block_lens[b, j]`` of them, if given). Returns
    (ids, is_mask, positions, mask, targets [B, J*K] (-1: none))."""
    torch = _torch()
    B, S = tokens.shape
    J = cuts.shape[1]
    ids = torch.zeros(B, S + J * K, dtype=torch.long)
    is_mask = torch.zeros(B, S + J * K, dtype=torch.bool)
    pos = torch.zeros(B, S + J * K, dtype=torch.long)
    targets = torch.full((B, J * K), -1, dtype=torch.long)
    ids[:, :S] = tokens
    pos[:, :S] = torch.arange(S)
    for b in range(B):
        n = int(lengths[b])
        for j in range(J):
            c = int(cuts[b, j])
            r0 = S + j * K
            ids[b, r0] = tokens[b, c]
            is_mask[b, r0 + 1:r0 + K] = True
            pos[b, r0:r0 + K] = c + torch.arange(K)
            kb = K if block_lens is None else int(block_lens[b, j])
            hi = min(n, c + 1 + kb)
            if hi > c + 1:
                targets[b, j * K:j * K + hi - c - 1] = tokens[b, c + 1:hi]
    return ids, is_mask, pos, training_mask(lengths, cuts, S, K, block_lens), targets


# ---------------------------------------------------------------- runtime
class BlockState:
    """One request's context cache: K/V of ``tokens`` for every layer in one
    buffer [layers, 2, kv heads, capacity, head dim] that grows by doubling
    (appending a step's few tokens copies only them)."""

    __slots__ = ("tokens", "kv", "key", "offset")

    def __init__(self, key: int) -> None:
        self.tokens = np.zeros(0, np.int64)
        self.kv: Any = None
        self.key = key
        self.offset = 0  # where the cached window starts in the request's sequence

    def drop(self) -> None:
        self.kv = None
        self.tokens = self.tokens[:0]


class BlockDrafterRuntime:
    """Runs a loaded drafter over requests: per-request context caches under
    one token bound (LRU eviction: an evicted request re-reads its window),
    and one batched pass per step that reads each row's new context tokens
    and drafts its block."""

    def __init__(self, path: str, dtype: str = "float32", max_context: int = 1024,
                 max_cached_tokens: int = 262144, top_m: int = 8) -> None:
        torch = _torch()
        self._torch = torch
        self.spec, self.module = load_drafter(path, dtype)
        self.dtype = str(self.module.mask_embed.dtype).removeprefix("torch.")
        # [H, V'] contiguous: the head as one plain matmul over all rows
        self._head_t = self.module.head.detach().t().contiguous()
        self.path = path
        self.block_size = self.spec.block_size
        self.vocab_size = self.spec.target.vocab_size
        self.draft_vocab = torch.as_tensor(self.spec.draft_vocab, dtype=torch.long)
        self.max_context = max(16, int(max_context))
        self.max_cached_tokens = int(max_cached_tokens)
        self.top_m = max(1, min(int(top_m), len(self.spec.draft_vocab)))
        self._live: "OrderedDict[int, BlockState]" = OrderedDict()
        self._lock = threading.Lock()
        self._next = 0
        self.stats = {"passes": 0, "rows": 0, "read_tokens": 0, "pass_seconds": 0.0,
                      "evictions": 0, "cached_tokens": 0}

    def new_state(self) -> BlockState:
        with self._lock:
            self._next += 1
            st = BlockState(self._next)
            self._live[st.key] = st
        return st

    def release(self, state: Optional[BlockState]) -> None:
        if state is None:
            return
        with self._lock:
            self._live.pop(state.key, None)
            state.drop()
            self._count()

    def _count(self) -> None:
        self.stats["cached_tokens"] = sum(len(s.tokens) for s in self._live.values())

    def _make_room(self, keep: set, extra: int) -> None:
        with self._lock:
            total = sum(len(s.tokens) for s in self._live.values())
            for key in list(self._live):
                if total + extra <= self.max_cached_tokens:
                    break
                s = self._live[key]
                if key in keep or s.kv is None:
                    continue
                total -= len(s.tokens)
                s.drop()
                self.stats["evictions"] += 1

    def _prepare(self, st: BlockState, ctx: np.ndarray) -> tuple[int, np.ndarray]:
        """Cut ``st``'s cache to what it shares with ``ctx[:-1]`` (in the
        window) and return (cached length kept, tokens to read)."""
        W = self.max_context
        n = len(ctx)
        if n - st.offset > 2 * W or (st.kv is None and n - st.offset > W) or n <= st.offset:
            st.offset = max(0, n - W)
            st.drop()
        seq = ctx[st.offset:n - 1]
        keep = common_prefix(st.tokens, seq) if st.kv is not None else 0
        if keep < len(st.tokens):
            st.tokens = st.tokens[:keep]  # the buffer past it is overwritten later
        return keep, seq[keep:]

    def _append(self, st: BlockState, new_kv: list, b: int, n: int) -> None:
        """Append row ``b``'s first ``n`` query keys/values (of every layer)."""
        have = len(st.tokens)
        need = have + n
        k0 = new_kv[0][0]
        if st.kv is None or st.kv.shape[3] < need:
            cap = max(64, 1 << (need - 1).bit_length())
            buf = k0.new_empty((len(new_kv), 2, k0.shape[1], cap, k0.shape[3]))
            if st.kv is not None and have:
                buf[:, :, :, :have] = st.kv[:, :, :, :have]
            st.kv = buf
        for li, (k, v) in enumerate(new_kv):
            st.kv[li, 0, :, have:need] = k[b, :, :n]
            st.kv[li, 1, :, have:need] = v[b, :, :n]

    def draft(self, states: list, contexts: list, block: Optional[int] = None):
        """One pass for the rows: (candidate ids int64 [B, K, top_m], their
        probabilities float32 [B, K, top_m]), best first, K = ``block`` (at
        most the trained block size); row i's position j is the drafter's
        guess for the token j+1 after its context."""
        torch = self._torch
        K = max(1, min(int(block or self.block_size), self.block_size))
        t0 = time.perf_counter()
        B = len(states)
        preps = [self._prepare(st, np.asarray(c, dtype=np.int64)) for st, c in zip(states, contexts)]
        self._make_room({s.key for s in states}, sum(len(r) for _, r in preps))
        past_len = [len(st.tokens) for st in states]
        P = max(past_len)
        N = max(len(r) for _, r in preps)
        Q = N + K
        mod = self.module
        dt = mod.mask_embed.dtype
        ids = torch.zeros(B, Q, dtype=torch.long)
        is_mask = torch.zeros(B, Q, dtype=torch.bool)
        pos = torch.zeros(B, Q, dtype=torch.long)
        mask = torch.zeros(B, 1, Q, P + Q, dtype=torch.bool)
        for b, ((keep, new), c) in enumerate(zip(preps, contexts)):
            n = len(new)
            if n:
                ids[b, :n] = torch.from_numpy(new)
            ids[b, N] = int(c[-1])
            is_mask[b, N + 1:] = True
            pos[b, :N] = keep + torch.arange(N)
            pos[b, N:] = keep + n + torch.arange(K)
            mask[b, 0, :, :keep] = True  # the cached context
            ar = torch.arange(n)
            mask[b, 0, :n, P:P + n] = ar[None, :] <= ar[:, None]
            mask[b, 0, N:, P:P + n] = True
            mask[b, 0, N:, P + N:] = True
            pad = torch.arange(n, N)
            mask[b, 0, pad, P + pad] = True  # padding rows: themselves (no NaN)
        L = len(self.spec.layer_ids)
        with torch.inference_mode():
            past = None
            if P and B == 1:
                kv = states[0].kv
                past = [(kv[li, 0, :, :P].unsqueeze(0), kv[li, 1, :, :P].unsqueeze(0))
                        for li in range(L)]
            elif P:
                shape = (L, 2, B, self.spec.num_kv_heads, P, self.spec.head_dim)
                pad = torch.zeros(shape, dtype=dt)
                for b, st in enumerate(states):
                    if past_len[b]:
                        pad[:, :, b, :, :past_len[b]] = st.kv[:, :, :, :past_len[b]]
                past = [(pad[li, 0], pad[li, 1]) for li in range(L)]
            x = mod.embed_inputs(ids, is_mask)
            h, new_kv = mod.run(x, pos, mask, past)
            hb = h[:, N:].reshape(B * K, -1)
            logits = (hb @ self._head_t).float()
            probs = torch.softmax(logits, dim=-1)
            top_p, top_i = probs.topk(self.top_m, dim=-1)
            cand = self.draft_vocab[top_i].view(B, K, -1)
            top_p = top_p.view(B, K, -1)
            for b, ((keep, new), st) in enumerate(zip(preps, states)):
                n = len(new)
                if n:
                    self._append(st, new_kv, b, n)
                    st.tokens = np.concatenate([st.tokens, new])
                    self.stats["read_tokens"] += n
        with self._lock:
            self._count()
        self.stats["passes"] += 1
        self.stats["rows"] += B
        self.stats["pass_seconds"] += time.perf_counter() - t0
        return cand.numpy(), top_p.numpy().astype(np.float32)

    def warmup(self) -> None:
        st = self.new_state()
        try:
            for n in (40, 41):
                self.draft([st], [np.arange(1, n + 1, dtype=np.int64) % self.vocab_size])
        finally:
            self.release(st)


def untrained_drafter(target_dir: str, target_name: str, layer_ids: list[int], block_size: int,
                      draft_vocab: list[int], out_dir: str) -> str:
    """Save a drafter straight from the target's weights (no training): the
    baseline a trained drafter is compared with."""
    spec, module = init_from_target(target_dir, target_name, layer_ids, block_size, draft_vocab)
    spec.training = {"steps": 0, "note": "untrained: the target's own weights"}
    save_drafter(out_dir, spec, module)
    return out_dir


def weighted_block_loss(logits, targets, decay: float):
    """Cross-entropy over a block's positions, weighted towards the block start
    (DEER-style): position i weighs exp(-i/decay) (decay <= 0: uniform).
    ``logits`` [B, J, K, V'], ``targets`` [B, J, K] in draft-vocab indices (-1: none)."""
    torch = _torch()
    K = targets.shape[-1]
    w = (torch.exp(-torch.arange(K, dtype=torch.float32) / decay) if decay > 0
         else torch.ones(K))
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 2).float(), targets.flatten().clamp(min=0),
                                           reduction="none").view_as(targets.float())
    valid = (targets >= 0).float()
    wv = valid * w
    return (ce * wv).sum() / wv.sum().clamp(min=1.0)


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)

