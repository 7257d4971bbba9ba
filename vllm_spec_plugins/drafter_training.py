"""``vllm-spec-plugins train-drafter``: a masked-block (diffusion) drafter
aligned to one target, trained on this machine.

1. **Corpus** (self-distillation): the target answers the training prompts
   of drafter_data.py (disjoint from every benchmark set) greedily, on vLLM;
   prompt and answer token ids are saved in ``corpus.npz`` (kept: a second
   run, or a resumed one, skips this).
2. **Drafter**: the target's embeddings, LM head (cut to the corpus's most
   frequent ``draft_vocab`` tokens) and a few of its layers, plus a learnt
   mask embedding (block_drafter.py).
3. **Training**: each sequence of a batch is encoded causally once, with
   ``blocks`` blocks packed after it; block ``j`` opens at a random point of
   the answer and predicts the ``block_size`` tokens that follow it from the
   context before it (masked-block objective). The loss weighs positions
   near the block start more (DEER-style ``exp(-i/decay)``). Embeddings and
   head stay frozen; the layers, final norm and mask embedding learn.
4. **Held-out estimate**: on answers to held-out prompts (never trained on),
   the mean acceptance length a greedy target would give the drafter's
   block (argmax path and path search), printed and saved in drafter.json.

A progress bar; a checkpoint every ``checkpoint_every_s`` seconds and at the
end (``checkpoint.pt``); a second run with the same ``--out`` resumes it; the
``--minutes`` budget bounds the training loop (the corpus's generation is
timed and reported apart).
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from vllm_spec_plugins import drafter_data
from vllm_spec_plugins.proposers import block_drafter as bd
from vllm_spec_plugins.proposers.lattice_path import (
    ContextNgram,
    argmax_path,
    causal_consistent_path,
)

CORPUS_FILE = "corpus.npz"
CHECKPOINT_FILE = "checkpoint.pt"


@dataclass
class TrainSettings:
    target: str = "smollm2-135m"
    out: str = "drafters/smollm2-135m"
    prompts: int = 2000
    max_tokens: int = 256
    dtype: str = "float32"           # the target's, for generating the corpus
    layers: Optional[str] = None     # e.g. "0,1,2,29"; None: the first and the last
    block_size: int = 10
    draft_vocab: int = 8192
    minutes: float = 60.0
    batch: int = 4                   # sequences per step
    blocks: int = 16                 # blocks packed per sequence
    seq_len: int = 320               # context tokens per sequence (a window of it)
    lr: float = 5e-4
    decay: float = 4.0               # DEER-style weight exp(-i/decay); <= 0: uniform
    heldout: float = 0.05            # share of prompts held out
    seed: int = 0
    checkpoint_every_s: float = 120.0
    max_steps: Optional[int] = None  # stop after this many steps (tests)
    progress: bool = True


def resolve_target(name_or_path: str) -> tuple[str, str]:
    """(directory, name) of a target: a model of `vllm-spec-plugins models` or a
    Hugging Face directory."""
    from vllm_spec_plugins.config import check_draft_model_path

    d = check_draft_model_path(name_or_path)
    if not os.path.isfile(os.path.join(d, "config.json")):
        raise ValueError(f"--target {name_or_path!r}: no local config.json (fetch it first)")
    return d, name_or_path


def default_layers(n_layers: int) -> list[int]:
    """The first layer and the last. Measured on SmolLM2-135M (README,
    "Diffusion drafter"): after the same 5 minutes of training, the first
    three and the last, the first four, and the first and the last reached
    the same held-out acceptance; the two-layer drafter ran twice the steps
    and costs half as much per pass."""
    if n_layers <= 2:
        return list(range(n_layers))
    return [0, n_layers - 1]


def parse_layers(text: Optional[str], n_layers: int) -> list[int]:
    if not text:
        return default_layers(n_layers)
    try:
        ids = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {text!r}: a comma-separated list of layer numbers, "
                         f"e.g. 0,1,2,{n_layers - 1}") from None
    bad = [i for i in ids if not 0 <= i < n_layers]
    if not ids or bad:
        raise ValueError(f"--layers {text!r}: layer numbers must be in 0..{n_layers - 1}")
    return ids


# ------------------------------------------------------------------ corpus
def generate_corpus(s: TrainSettings, target_dir: str, path: str) -> dict:
    """Greedy answers of the target to the training prompts, on vLLM."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = drafter_data.training_prompts(s.prompts, s.seed)
    prompts, removed = drafter_data.check_disjoint(prompts)
    tok = AutoTokenizer.from_pretrained(target_dir)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                   tokenize=True) for p in prompts]
    ids = [list(x["input_ids"] if isinstance(x, dict) or hasattr(x, "keys") else x) for x in ids]
    max_len = max(len(x) for x in ids) + s.max_tokens + 8
    t0 = time.perf_counter()
    llm = LLM(model=target_dir, dtype=s.dtype, enforce_eager=True, seed=s.seed,
              max_model_len=min(4096, max_len), kv_cache_memory_bytes=2 << 30,
              max_num_seqs=64)
    outs = llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids],
                        SamplingParams(temperature=0.0, max_tokens=s.max_tokens),
                        use_tqdm=s.progress)
    gen_s = time.perf_counter() - t0
    del llm
    answers = [list(o.outputs[0].token_ids) for o in outs]
    rng = random.Random(f"heldout:{s.seed}")
    held = np.array([rng.random() < s.heldout for _ in prompts], dtype=bool)
    flat = np.concatenate([np.asarray(p + a, dtype=np.int32) for p, a in zip(ids, answers)])
    lens = np.array([len(p) + len(a) for p, a in zip(ids, answers)], dtype=np.int64)
    plens = np.array([len(p) for p in ids], dtype=np.int64)
    eos = tok.eos_token_id
    meta = {"prompts": len(prompts), "removed_as_benchmark": removed,
            "generated_tokens": int(sum(len(a) for a in answers)),
            "generate_seconds": round(gen_s, 1), "target_dtype": s.dtype,
            "max_tokens": s.max_tokens, "seed": s.seed, "data": drafter_data.DATA_NOTE,
            "eos_token_ids": [int(eos)] if eos is not None else []}
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=flat, lengths=lens, prompt_lengths=plens, heldout=held,
             meta=np.array(json.dumps(meta)))
    os.replace(tmp, path)
    return meta


class Corpus:
    def __init__(self, path: str) -> None:
        z = np.load(path)
        self.tokens = z["tokens"].astype(np.int64)
        self.lengths = z["lengths"]
        self.prompt_lengths = z["prompt_lengths"]
        self.heldout = z["heldout"]
        self.meta = json.loads(str(z["meta"]))
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)[:-1]])
        # sequences with an answer of at least 2 tokens
        ok = self.lengths - self.prompt_lengths >= 2
        self.train_ids = np.flatnonzero(ok & ~self.heldout)
        self.held_ids = np.flatnonzero(ok & self.heldout)

    def seq(self, i: int) -> np.ndarray:
        return self.tokens[self.starts[i]:self.starts[i] + self.lengths[i]]

    def answer_tokens(self) -> np.ndarray:
        return np.concatenate([self.seq(i)[self.prompt_lengths[i]:] for i in self.train_ids])


def draft_vocab_of(corpus: Corpus, size: int, vocab_size: int, always: list[int]) -> list[int]:
    """The ``size`` most frequent tokens of the training answers (and prompts),
    with ``always`` (EOS) included; ascending ids."""
    counts = np.bincount(corpus.tokens, minlength=vocab_size).astype(np.float64)
    counts += 0.5 * np.bincount(corpus.answer_tokens(), minlength=vocab_size)
    order = np.argsort(-counts, kind="stable")
    chosen = set(int(t) for t in always if 0 <= t < vocab_size)
    for t in order:
        if len(chosen) >= min(size, vocab_size):
            break
        chosen.add(int(t))
    return sorted(chosen)


# ---------------------------------------------------------------- batches
def sample_batch(corpus: Corpus, ids: np.ndarray, rng: np.random.Generator, s: TrainSettings):
    """A packed batch: per sequence a window of at most ``seq_len`` tokens
    ending inside the answer, and ``blocks`` cut points in its answer part."""
    torch = bd._torch()
    B, S, J = s.batch, s.seq_len, s.blocks
    toks = torch.zeros(B, S, dtype=torch.long)
    lens = np.zeros(B, np.int64)
    cuts = np.zeros((B, J), np.int64)
    for b in range(B):
        i = int(rng.choice(ids))
        seq = corpus.seq(i)
        p = int(corpus.prompt_lengths[i])
        end = int(rng.integers(min(len(seq), p + 2), len(seq) + 1))
        start = max(0, end - S)
        w = seq[start:end]
        toks[b, :len(w)] = torch.from_numpy(w)
        lens[b] = len(w)
        lo = max(0, p - 1 - start)  # the block's first query: the last prompt token or later
        hi = len(w) - 2             # at least one target after it
        cuts[b] = rng.integers(lo, max(lo, hi) + 1, size=J)
    # Half the blocks are full, half shorter (1..K): inference runs a shorter
    # block when the rows need fewer tokens (adaptive length).
    K = s.block_size
    block_lens = np.where(rng.random((B, J)) < 0.5, K, rng.integers(1, K + 1, size=(B, J)))
    return toks, lens, cuts, block_lens


def batch_loss(module, spec, toks, lens, cuts, block_lens, vocab_index, decay: float):
    torch = bd._torch()
    K = spec.block_size
    ids, is_mask, pos, mask, targets = bd.train_inputs(toks, lens, torch.as_tensor(cuts), K,
                                                       block_lens)
    S = toks.shape[1]
    x = module.embed_inputs(ids, is_mask)
    h, _ = module.run(x, pos, mask)
    logits = module.logits(h[:, S:])  # [B, J*K, V']
    t = vocab_index[targets.clamp(min=0)]
    t = torch.where(targets >= 0, t, torch.full_like(t, -1))
    B, J = cuts.shape
    logits = logits.view(B, J, K, -1)
    t = t.view(B, J, K)
    loss = bd.weighted_block_loss(logits, t, decay)
    with torch.no_grad():
        hit = (logits.argmax(-1) == t) & (t >= 0)
        first = hit[..., 0].float().mean()
    return loss, float(first)


# --------------------------------------------------------------- held-out
def heldout_acceptance(module, spec, corpus: Corpus, n_cuts: int = 300, seed: int = 1,
                       path_search: bool = True, eos: tuple = ()) -> dict:
    """Mean acceptance length (1 + accepted draft tokens) that greedy
    verification would give the drafter's block at random points of held-out
    answers (the answers are the target's own greedy text, so a drafted token
    is accepted exactly when it equals the next one): argmax path and, with
    ``path_search``, the causal-consistency path."""
    torch = bd._torch()
    rng = np.random.default_rng(seed)
    ids = corpus.held_ids if len(corpus.held_ids) else corpus.train_ids
    K = spec.block_size
    dv = torch.as_tensor(spec.draft_vocab, dtype=torch.long)
    acc_arg, acc_cps = [], []
    per_pos = np.zeros(K, np.int64)
    module.eval()
    with torch.inference_mode():
        for _ in range(n_cuts):
            i = int(rng.choice(ids))
            seq = corpus.seq(i)
            p = int(corpus.prompt_lengths[i])
            c = int(rng.integers(max(0, p - 1), len(seq) - 1))
            start = max(0, c - 511)
            w = torch.from_numpy(seq[start:c + 1]).unsqueeze(0)
            cuts = torch.tensor([[c - start]])
            tk, is_mask, pos, mask, _ = bd.train_inputs(w, [w.shape[1]], cuts, K)
            h, _ = module.run(module.embed_inputs(tk, is_mask), pos, mask)
            pr = torch.softmax(module.logits(h[0, w.shape[1]:]).float(), -1)
            tp, ti = pr.topk(16, dim=-1)
            cand = dv[ti].numpy()
            truth = seq[c + 1:c + 1 + K]

            def accepted(path):
                n = 0
                for a, b in zip(path, truth):
                    if int(a) != int(b):
                        break
                    n += 1
                return n

            toks, _ = argmax_path(cand, tp.numpy(), K, eos)
            a = accepted(toks)
            acc_arg.append(a)
            per_pos[:a] += 1
            if path_search:
                ng = ContextNgram(len(spec.draft_vocab))
                ng.add(seq[:c + 1].tolist())
                toks, _ = causal_consistent_path(cand, tp.numpy(), K, ng, eos=eos)
                acc_cps.append(accepted(toks))
    out = {"cuts": n_cuts, "acceptance_length_argmax": round(1 + float(np.mean(acc_arg)), 3),
           "reached_per_position": (per_pos / max(1, n_cuts)).round(3).tolist()}
    if acc_cps:
        out["acceptance_length_path_search"] = round(1 + float(np.mean(acc_cps)), 3)
    module.train()
    return out


# ------------------------------------------------------------------ main
def train(s: TrainSettings, log=print) -> dict:
    """Run the recipe (see module note); returns the drafter's training record."""
    torch = bd._torch()
    torch.manual_seed(s.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    target_dir, target_name = resolve_target(s.target)
    os.makedirs(s.out, exist_ok=True)
    corpus_path = os.path.join(s.out, CORPUS_FILE)
    if not os.path.isfile(corpus_path):
        log(f"[train-drafter] generating the corpus: {s.prompts} prompts, up to "
            f"{s.max_tokens} tokens each, answered by {target_name}")
        generate_corpus(s, target_dir, corpus_path)
    corpus = Corpus(corpus_path)
    log(f"[train-drafter] corpus: {len(corpus.train_ids)} training / {len(corpus.held_ids)} "
        f"held-out answers, {corpus.meta['generated_tokens']} generated tokens "
        f"({corpus.meta['generate_seconds']} s)")
    cfg = bd.hf_config(target_dir)
    layers = parse_layers(s.layers, int(cfg["num_hidden_layers"]))
    eos = corpus.meta.get("eos_token_ids", [])
    vocab = draft_vocab_of(corpus, s.draft_vocab, int(cfg["vocab_size"]), eos)
    spec, module = bd.init_from_target(target_dir, target_name, layers, s.block_size, vocab)
    vocab_index = torch.full((int(cfg["vocab_size"]),), -1, dtype=torch.long)
    vocab_index[torch.as_tensor(vocab)] = torch.arange(len(vocab))
    params = [p for p in module.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.0)
    step, trained_s = 0, 0.0
    ck_path = os.path.join(s.out, CHECKPOINT_FILE)
    if os.path.isfile(ck_path):
        ck = torch.load(ck_path, weights_only=False)
        if ck.get("layers") == layers and ck.get("draft_vocab") == vocab:
            module.load_state_dict(ck["module"], strict=False)
            opt.load_state_dict(ck["opt"])
            step, trained_s = int(ck["step"]), float(ck["trained_seconds"])
            log(f"[train-drafter] resumed at step {step} ({trained_s / 60:.1f} min trained)")
        else:
            log("[train-drafter] checkpoint is for other settings (layers/vocabulary): "
                "starting over")
    budget_s = s.minutes * 60.0
    rng = np.random.default_rng(s.seed + step)
    module.train()
    from tqdm import tqdm

    bar = tqdm(total=int(budget_s), initial=int(min(trained_s, budget_s)), unit="s",
               desc="train-drafter", disable=not s.progress, dynamic_ncols=True)
    last_ck = time.perf_counter()
    ema_loss = ema_first = None

    def save_checkpoint():
        tmp = ck_path + ".tmp"
        torch.save({"module": {k: v for k, v in module.state_dict().items()
                               if k not in ("embed", "head")},
                    "opt": opt.state_dict(), "step": step, "trained_seconds": trained_s,
                    "layers": layers, "draft_vocab": vocab}, tmp)
        os.replace(tmp, ck_path)

    while trained_s < budget_s and (s.max_steps is None or step < s.max_steps):
        t0 = time.perf_counter()
        lr = s.lr * min(1.0, (step + 1) / 50)  # warm-up, then constant
        for g in opt.param_groups:
            g["lr"] = lr
        toks, lens, cuts, block_lens = sample_batch(corpus, corpus.train_ids, rng, s)
        loss, first = batch_loss(module, spec, toks, lens, cuts, block_lens, vocab_index,
                                 s.decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        trained_s += dt
        lv = float(loss.detach())
        ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
        ema_first = first if ema_first is None else 0.95 * ema_first + 0.05 * first
        bar.update(int(trained_s) - bar.n)
        bar.set_postfix(step=step, loss=f"{ema_loss:.3f}", first_token_acc=f"{ema_first:.2f}")
        if time.perf_counter() - last_ck > s.checkpoint_every_s:
            save_checkpoint()
            last_ck = time.perf_counter()
    bar.close()
    save_checkpoint()
    module.eval()
    held = heldout_acceptance(module, spec, corpus, eos=tuple(eos))
    spec.training = {"steps": step, "trained_minutes": round(trained_s / 60, 2),
                     "settings": {k: v for k, v in asdict(s).items()
                                  if k not in ("out", "progress", "max_steps")},
                     "corpus": corpus.meta, "heldout": held,
                     "eos_token_ids": eos, "trainable_parameters": bd.n_params(module)}
    bd.save_drafter(s.out, spec, module)
    log(f"[train-drafter] {step} steps in {trained_s / 60:.1f} min; held-out mean acceptance "
        f"length (greedy, block {s.block_size}): argmax path {held['acceptance_length_argmax']}"
        + (f", path search {held['acceptance_length_path_search']}"
           if "acceptance_length_path_search" in held else ""))
    log(f"[train-drafter] saved {s.out} (use it as "
        f'{{"method": "diffusion", "drafter": "{s.out}"}}; configs/diffusion.json names '
        "the default model's by name)")
    return spec.training


def evaluate_untrained(s: TrainSettings) -> dict:
    """The held-out estimate of a drafter straight from the target's weights
    (the baseline training must beat); needs the corpus of ``s.out``."""
    target_dir, target_name = resolve_target(s.target)
    corpus = Corpus(os.path.join(s.out, CORPUS_FILE))
    cfg = bd.hf_config(target_dir)
    layers = parse_layers(s.layers, int(cfg["num_hidden_layers"]))
    eos = corpus.meta.get("eos_token_ids", [])
    vocab = draft_vocab_of(corpus, s.draft_vocab, int(cfg["vocab_size"]), eos)
    spec, module = bd.init_from_target(target_dir, target_name, layers, s.block_size, vocab)
    return heldout_acceptance(module, spec, corpus, eos=tuple(eos))


def add_arguments(p) -> None:
    d = TrainSettings()
    p.add_argument("--target", default=d.target,
                   help="model of `vllm-spec-plugins models list` or a Hugging Face directory")
    p.add_argument("--out", default=None,
                   help="drafter directory (default ~/.cache/vllm-spec-plugins/drafters/TARGET)")
    p.add_argument("--prompts", type=int, default=d.prompts,
                   help="training prompts answered by the target (5%% held out)")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per answer")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"],
                   help="the target's dtype while it writes the corpus")
    p.add_argument("--layers", default=None,
                   help="target layers the drafter starts from, e.g. 0,1,2,29 "
                        "(default: the first and the last)")
    p.add_argument("--block-size", type=int, default=d.block_size,
                   help="tokens drafted per pass (the longest draft)")
    p.add_argument("--draft-vocab", type=int, default=d.draft_vocab,
                   help="tokens the drafter can draft (the corpus's most frequent)")
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="training time budget (the corpus's generation is extra)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--blocks", type=int, default=d.blocks, help="blocks packed per sequence")
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--decay", type=float, default=d.decay,
                   help="loss weight exp(-i/decay) at block position i (<= 0: uniform)")
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def default_out(target: str) -> str:
    from vllm_spec_plugins.models import drafters_root

    return str(drafters_root() / os.path.basename(target.rstrip("/")))


def run_from_args(args) -> int:
    if args.minutes <= 0 and args.max_steps is None:
        raise ValueError("--minutes must be > 0")
    for name in ("prompts", "max_tokens", "block_size", "draft_vocab", "batch", "blocks",
                 "seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.block_size > 64:
        raise ValueError("--block-size must be <= 64")
    s = TrainSettings(target=args.target, out=args.out or default_out(args.target),
                      prompts=args.prompts, max_tokens=args.max_tokens, dtype=args.dtype,
                      layers=args.layers, block_size=args.block_size,
                      draft_vocab=args.draft_vocab, minutes=args.minutes, batch=args.batch,
                      blocks=args.blocks, seq_len=args.seq_len, lr=args.lr, decay=args.decay,
                      max_steps=args.max_steps, seed=args.seed, progress=not args.quiet)
    train(s)
    return 0
