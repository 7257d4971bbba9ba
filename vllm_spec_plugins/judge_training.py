"""``vllm-spec-plugins train-judge``: mine labels automatically, fit the judge head.

AutoJudge-style (garipovroma/autojudge's idea, our code):

1. **Tasks** the benchmark never scores: HumanEval tasks with *odd* task
   numbers (the quality report uses the even ones, workload ``code_even``)
   and reasoning-gym ``gsm_symbolic`` problems from a seed the benchmark does
   not use (:data:`MATH_SEED`; any problem also in the benchmark's seed-0 set
   is dropped).
2. The target answers each greedily (vLLM). Its outcome: the HumanEval tests
   pass / the math answer.
3. **Alternatives**: where a draft model's greedy token (``--draft-model``;
   AutoJudge's setting) or, without one, the target's own second choice,
   differs from the target's token along the target's answer. Up to
   ``--per-task`` such positions per task are sampled.
4. **Labels**: the alternative is swapped in and the target continues
   greedily for ``--window`` tokens. If the continuation falls back into the
   original answer (the same ``ALIGN`` tokens appear in both), the rest of the
   original is spliced on; the result is graded like the original. The swap
   is *acceptable* when the outcome is unchanged (tests still pass; same
   answer). A continuation that never falls back within the window is
   labelled *not acceptable* (conservative: the judge learns to refuse it).
   Code tasks whose original answer fails its tests are skipped (nothing to
   lose there, so no label says anything).
5. **Features** (``scorers.judge.judge_features``): the target's final hidden
   state that predicted the position and the one after reading the
   alternative, plus four numbers from the target's distribution there,
   computed with transformers on the same weights.
6. **Head**: logistic regression (class-balanced, L2) on the standardised
   features; the threshold is chosen on held-out tasks so that at most
   ``--max-false-accept`` of the not-acceptable swaps are accepted.

Every phase is kept in ``OUT/work`` and reused on a rerun (resumable);
``--minutes`` bounds the mining (what was mined by then is used). Progress
bars throughout. No vLLM import at module level.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

#: reasoning-gym seed of the judge's math problems (the benchmark uses 0).
MATH_SEED = 7919
#: Tokens that must match for a continuation to count as back in the original.
ALIGN = 4
DATA_NOTE = ("HumanEval tasks with odd task numbers (the benchmark's code_even set is the even "
             f"ones) and reasoning-gym gsm_symbolic problems of seed {MATH_SEED} (problems also "
             "in the benchmark's seed-0 math set removed); labels mined automatically "
             "(AutoJudge-style: swap, continue, same task outcome)")


@dataclass
class JudgeTrainSettings:
    target: str = "qwen2.5-coder-1.5b"
    out: str = ""
    draft_model: Optional[str] = None
    code_tasks: int = 82
    math_tasks: int = 40
    max_tokens: int = 320
    per_task: int = 6
    window: int = 40
    dtype: str = "bfloat16"
    minutes: float = 30.0
    max_false_accept: float = 0.1
    heldout: float = 0.25
    seed: int = 0
    progress: bool = True


# ----------------------------------------------------------------------------- tasks
def judge_tasks(code_tasks: int, math_tasks: int, seed: int = 0) -> list[dict]:
    """[{"kind", "messages", "reference"}]: the training tasks (module note)."""
    from vllm_spec_plugins.bench.workloads import load_humaneval, load_math

    out: list[dict] = []
    if code_tasks > 0:
        w = load_humaneval(None, seed, parity="odd")
        for msgs, ref in list(zip(w.prompts, w.references))[:code_tasks]:
            out.append({"kind": "code", "messages": msgs, "reference": ref})
    if math_tasks > 0:
        bench = {json.dumps(p) for p in load_math(max(200, math_tasks), 0).prompts}
        w = load_math(math_tasks + 20, MATH_SEED)
        for msgs, ref in zip(w.prompts, w.references):
            if json.dumps(msgs) in bench:
                continue
            out.append({"kind": "math", "messages": msgs, "reference": ref})
            if sum(t["kind"] == "math" for t in out) >= math_tasks:
                break
    return out


def outcome(kind: str, reply: str, reference: Any) -> Any:
    """What must not change: pass/fail of the tests, or the extracted answer."""
    from vllm_spec_plugins.bench import tasks

    if kind == "code":
        return bool(tasks.check_humaneval(reply, reference).passed)
    return tasks.extract_answer(reply)


def splice(original: list[int], t: int, alt: int, cont: list[int], eos: set[int],
           align: int = ALIGN) -> Optional[list[int]]:
    """The answer after swapping ``alt`` in at ``t``: ``original[:t] + [alt] +
    cont[:i] + original[j:]`` where ``cont[i:i+align] == original[j:j+align]``
    (the continuation fell back into the original), or the continuation itself
    when it ended (EOS); None when it did neither within its length."""
    head = list(original[:t]) + [int(alt)]
    index: dict[tuple, int] = {}
    for j in range(t + 1, len(original) - align + 1):
        index.setdefault(tuple(original[j:j + align]), j)
    for i in range(0, len(cont) - align + 1):
        j = index.get(tuple(cont[i:i + align]))
        if j is not None:
            return head + list(cont[:i]) + list(original[j:])
    if cont and cont[-1] in eos:
        return head + list(cont)
    if len(original) - t <= align and len(cont) >= len(original) - t:
        return head + list(cont)  # the original ended within the window
    return None


# ----------------------------------------------------------------------------- features
class TargetFeatures:
    """Teacher-forced target passes (transformers) for the judge's features."""

    def __init__(self, target_dir: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(
            target_dir, dtype=getattr(torch, dtype)).eval()

    def run(self, ids: list[int], positions: list[int], alts: list[int]
            ) -> tuple[np.ndarray, np.ndarray]:
        """For each (position p in ids, alternative a): features of putting a
        at p after ids[:p]. Returns (features [N, 2H+4], target top-2 at every
        position of ids [len, 2])."""
        from transformers import DynamicCache

        from vllm_spec_plugins.scorers.judge import judge_features

        torch = self.torch
        with torch.no_grad():
            cache = DynamicCache()
            out = self.model.model(input_ids=torch.tensor([ids]), past_key_values=cache,
                                   use_cache=True)
            hidden = out.last_hidden_state[0]             # [L, H]; row i predicts ids[i+1]
            logits = self.model.lm_head(hidden).float()   # [L, V]
            top2 = torch.topk(logits, 2, dim=-1).indices.numpy()
            feats = [None] * len(positions)
            order = sorted(range(len(positions)), key=lambda i: -positions[i])
            for i in order:  # descending: each crop only shortens the cache
                p, a = positions[i], alts[i]
                drop = cache.get_seq_length() - p
                if drop > 0:  # keep ids[:p] (a negative crop: transformers' newer form)
                    cache.crop(-drop)
                post = self.model.model(input_ids=torch.tensor([[a]]), past_key_values=cache,
                                        use_cache=True).last_hidden_state[0]
                f = judge_features(hidden[p - 1:p], post, logits[p - 1:p],
                                   torch.tensor([a]))
                feats[i] = f[0].float().numpy()
        return (np.stack(feats) if feats else np.zeros((0, 0), np.float32)), top2


def draft_top1(draft_dir: str, ids: list[int], dtype: str, cache: dict) -> np.ndarray:
    """The draft model's greedy token after every prefix of ids."""
    import torch
    from transformers import AutoModelForCausalLM

    if "model" not in cache:
        cache["model"] = AutoModelForCausalLM.from_pretrained(
            draft_dir, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        return cache["model"](input_ids=torch.tensor([ids])).logits[0].argmax(-1).numpy()


# ----------------------------------------------------------------------------- head
def fit_head(X: np.ndarray, y: np.ndarray, groups: np.ndarray, s: JudgeTrainSettings,
             log=print) -> dict:
    """Logistic regression; threshold from held-out groups (tasks)."""
    import torch

    rng = np.random.default_rng(s.seed)
    uniq = np.unique(groups)
    held_groups = set(rng.choice(uniq, size=max(1, int(round(len(uniq) * s.heldout))),
                                 replace=False).tolist()) if len(uniq) > 1 else set()
    held = np.array([g in held_groups for g in groups])

    def train(Xt: np.ndarray, yt: np.ndarray) -> tuple:
        mean = Xt.mean(0)
        std = Xt.std(0) + 1e-4
        xt = torch.tensor((Xt - mean) / std, dtype=torch.float32)
        yt_t = torch.tensor(yt, dtype=torch.float32)
        pos = max(1.0, float(yt.sum()))
        neg = max(1.0, float(len(yt) - yt.sum()))
        w = torch.zeros(xt.shape[1], requires_grad=True)
        b = torch.zeros((), requires_grad=True)
        opt = torch.optim.Adam([w, b], lr=0.01)
        weights = torch.where(yt_t > 0.5, torch.tensor(len(yt) / (2 * pos)),
                              torch.tensor(len(yt) / (2 * neg)))
        for _ in range(400):
            opt.zero_grad()
            z = xt @ w + b
            loss = (torch.nn.functional.binary_cross_entropy_with_logits(
                z, yt_t, weight=weights) + 1e-2 * (w * w).sum() / xt.shape[1] * 10)
            loss.backward()
            opt.step()
        return w.detach(), float(b.detach()), mean, std

    def probs(model, Xe):
        w, b, mean, std = model
        return torch.sigmoid(torch.tensor((Xe - mean) / std, dtype=torch.float32) @ w + b).numpy()

    report: dict = {"examples": int(len(y)), "acceptable": int(y.sum()),
                    "tasks_with_swaps": int(len(uniq)), "heldout_tasks": len(held_groups)}
    threshold = 0.5
    if held.any() and (~held).any() and len(np.unique(y[~held])) == 2:
        model = train(X[~held], y[~held])
        ph, yh = probs(model, X[held]), y[held]
        bad = ph[yh < 0.5]
        # The smallest threshold accepting at most max_false_accept of the bad swaps.
        if len(bad):
            q = np.sort(bad)[::-1]
            allowed = int(math.floor(s.max_false_accept * len(bad)))
            threshold = float(min(0.99, max(0.5, q[allowed] + 1e-6 if allowed < len(q) else 0.5)))
        good = ph[yh > 0.5]
        report.update({
            "heldout_examples": int(held.sum()),
            "heldout_recall": round(float((good >= threshold).mean()), 3) if len(good) else None,
            "heldout_false_accept": round(float((bad >= threshold).mean()), 3) if len(bad) else None,
            "heldout_auc": _auc(ph, yh)})
    if len(np.unique(y)) < 2:
        raise RuntimeError(f"all {len(y)} mined labels are the same ({int(y[0]) if len(y) else '-'}"
                           "): mine more tasks (--code-tasks/--math-tasks/--per-task)")
    w, b, mean, std = train(X, y)
    report["threshold"] = round(threshold, 4)
    log(f"[train-judge] head: {report}")
    return {"weight": w, "bias": b, "mean": torch.tensor(mean, dtype=torch.float32),
            "std": torch.tensor(std, dtype=torch.float32), "threshold": threshold,
            "report": report}


def _auc(p: np.ndarray, y: np.ndarray) -> Optional[float]:
    pos, neg = p[y > 0.5], p[y < 0.5]
    if not len(pos) or not len(neg):
        return None
    wins = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    return round(float(wins), 3)


# ----------------------------------------------------------------------------- pipeline
def _load(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _save(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def train_judge(s: JudgeTrainSettings, log=print) -> str:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_spec_plugins.drafter_training import resolve_target
    from vllm_spec_plugins.scorers.judge import JudgeHead, JudgeTarget, save_head

    t_start = time.perf_counter()
    deadline = t_start + s.minutes * 60.0
    target_dir, target_name = resolve_target(s.target)
    draft_dir = resolve_target(s.draft_model)[0] if s.draft_model else None
    work = os.path.join(s.out, "work")
    os.makedirs(work, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(target_dir)
    eos = {int(x) for x in ([tok.eos_token_id] if tok.eos_token_id is not None else [])}
    hf = AutoConfig.from_pretrained(target_dir)
    eos |= {int(x) for x in (hf.eos_token_id if isinstance(hf.eos_token_id, list)
                             else [hf.eos_token_id] if hf.eos_token_id is not None else [])}

    tasks = judge_tasks(s.code_tasks, s.math_tasks, s.seed)
    log(f"[train-judge] {len(tasks)} tasks ({sum(t['kind'] == 'code' for t in tasks)} code, "
        f"{sum(t['kind'] == 'math' for t in tasks)} math); work files in {work}")
    prompt_ids = []
    for t in tasks:
        x = tok.apply_chat_template(t["messages"], add_generation_prompt=True, tokenize=True)
        prompt_ids.append(list(x["input_ids"] if hasattr(x, "keys") else x))

    llm_box: dict = {}

    def llm():
        if "llm" not in llm_box:
            from vllm import LLM

            longest = max(len(p) for p in prompt_ids) + s.max_tokens + s.window + 8
            llm_box["llm"] = LLM(model=target_dir, dtype=s.dtype, enforce_eager=True,
                                 seed=s.seed, max_model_len=min(4096, longest),
                                 kv_cache_memory_bytes=2 << 30, max_num_seqs=64)
        return llm_box["llm"]

    # 1-2. the target's answers and their outcomes
    replies_path = os.path.join(work, "replies.json")
    if os.path.isfile(replies_path) and len(_load(replies_path)["replies"]) == len(tasks):
        replies = _load(replies_path)["replies"]
        log("[train-judge] answers: reused")
    else:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        outs = llm().generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids],
                              SamplingParams(temperature=0.0, max_tokens=s.max_tokens),
                              use_tqdm=s.progress)
        replies = [list(o.outputs[0].token_ids) for o in outs]
        _save(replies_path, {"replies": replies})
    outcomes = [outcome(t["kind"], tok.decode(r, skip_special_tokens=True), t["reference"])
                for t, r in zip(tasks, replies)]
    usable = [i for i, t in enumerate(tasks)
              if (t["kind"] == "math" and outcomes[i] is not None)
              or (t["kind"] == "code" and outcomes[i] is True)]
    log(f"[train-judge] usable tasks: {len(usable)} of {len(tasks)} (code whose answer passes, "
        "math with an answer)")

    # 3 + 5. alternatives and features (transformers), per task
    from tqdm import tqdm

    feats_path = os.path.join(work, "candidates.npz")
    if os.path.isfile(feats_path):
        z = np.load(feats_path)
        X, cand = z["X"], z["cand"]
        log(f"[train-judge] candidates: reused ({len(cand)})")
    else:
        feat = TargetFeatures(target_dir, s.dtype)
        dcache: dict = {}
        rng = random.Random(f"judge:{s.seed}")
        rows, cands = [], []
        for i in tqdm(usable, desc="features", disable=not s.progress):
            if time.perf_counter() > deadline:
                log("[train-judge] --minutes reached while computing features")
                break
            ids = prompt_ids[i] + replies[i]
            P = len(prompt_ids[i])
            if draft_dir:
                top = draft_top1(draft_dir, ids, s.dtype, dcache)  # top[j] follows ids[:j+1]
                pos = [P + t for t in range(len(replies[i])) if int(top[P + t - 1]) != replies[i][t]
                       and int(top[P + t - 1]) not in eos]
                alt_of = {p: int(top[p - 1]) for p in pos}
            else:
                pos, alt_of = list(range(P, len(ids))), None
            if not pos:
                continue
            pick = sorted(rng.sample(pos, min(s.per_task, len(pos))))
            if alt_of is None:
                _, top2 = feat.run(ids, [], [])
                alt_of = {p: int(top2[p - 1][1]) for p in pick}
            alts = [alt_of[p] for p in pick]
            f, _ = feat.run(ids, pick, alts)
            for p, a, row in zip(pick, alts, f):
                rows.append(row)
                cands.append((i, p - P, a))
        X = np.stack(rows).astype(np.float32) if rows else np.zeros((0, 1), np.float32)
        cand = np.array(cands, dtype=np.int64).reshape(-1, 3)
        np.savez(feats_path, X=X, cand=cand)
        del feat, dcache
    log(f"[train-judge] {len(cand)} swaps to label")

    # 4. labels: swap, continue, splice, same outcome?
    labels_path = os.path.join(work, "labels.json")
    labels = _load(labels_path)["labels"] if os.path.isfile(labels_path) else None
    if labels is None or len(labels) != len(cand):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        reqs = [TokensPrompt(prompt_token_ids=[int(x) for x in
                                                 prompt_ids[i] + replies[i][:t] + [a]])
                for i, t, a in cand.tolist()]
        outs = llm().generate(reqs, SamplingParams(temperature=0.0, max_tokens=s.window),
                              use_tqdm=s.progress) if reqs else []
        from concurrent.futures import ThreadPoolExecutor

        def grade(pair) -> int:
            (i, t, a), o = pair
            new = splice(replies[i], int(t), int(a), list(o.outputs[0].token_ids), eos)
            if new is None:
                return -1
            got = outcome(tasks[i]["kind"], tok.decode(new, skip_special_tokens=True),
                          tasks[i]["reference"])
            return int(got == outcomes[i])

        with ThreadPoolExecutor(max_workers=4) as pool:
            graded = list(tqdm(pool.map(grade, zip(cand, outs)), total=len(outs),
                               desc="grading", disable=not s.progress))
        fallbacks = sum(g < 0 for g in graded)
        labels = [max(g, 0) for g in graded]
        _save(labels_path, {"labels": labels, "no_fallback": fallbacks})
        log(f"[train-judge] labelled {len(labels)}: {sum(labels)} acceptable; {fallbacks} "
            f"never fell back within {s.window} tokens (labelled not acceptable)")
    llm_box.clear()

    # 6. the head
    y = np.asarray(labels, dtype=np.float32)
    fit = fit_head(X, y, cand[:, 0] if len(cand) else np.zeros(0), s, log)
    target = JudgeTarget(os.path.basename(target_name.rstrip("/")),
                         (hf.architectures or ["?"])[0], int(hf.hidden_size),
                         int(hf.vocab_size), int(hf.num_hidden_layers))
    training = {"data": DATA_NOTE, "tasks": len(tasks), "usable_tasks": len(usable),
                "code_tasks": s.code_tasks, "math_tasks": s.math_tasks,
                "math_seed": MATH_SEED, "alternatives": s.draft_model or "target's second choice",
                "per_task": s.per_task, "window": s.window, "max_tokens": s.max_tokens,
                "dtype": s.dtype, "max_false_accept": s.max_false_accept,
                "minutes": round((time.perf_counter() - t_start) / 60.0, 1), **fit["report"]}
    head = JudgeHead(fit["weight"], fit["bias"], fit["mean"], fit["std"], fit["threshold"],
                     target, training)
    save_head(head, s.out)
    log(f"[train-judge] saved {s.out} (threshold {fit['threshold']:.3f})")
    return s.out


# ----------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    d = JudgeTrainSettings()
    p.add_argument("--target", default=d.target,
                   help="model of `vllm-spec-plugins models list` or a Hugging Face directory")
    p.add_argument("--draft-model", default=None,
                   help="where alternatives come from (AutoJudge: the drafter the judge will "
                        "serve with); default: the target's own second choice")
    p.add_argument("--out", default=None,
                   help="head directory (default ~/.cache/vllm-spec-plugins/judges/TARGET)")
    p.add_argument("--code-tasks", type=int, default=d.code_tasks,
                   help="HumanEval tasks with odd numbers to mine (at most 82)")
    p.add_argument("--math-tasks", type=int, default=d.math_tasks,
                   help=f"gsm_symbolic problems of seed {MATH_SEED} to mine")
    p.add_argument("--max-tokens", type=int, default=d.max_tokens, help="per answer")
    p.add_argument("--per-task", type=int, default=d.per_task, help="swaps labelled per task")
    p.add_argument("--window", type=int, default=d.window,
                   help="tokens the target continues after a swap to fall back into its answer")
    p.add_argument("--dtype", default=d.dtype, choices=["float32", "bfloat16"])
    p.add_argument("--minutes", type=float, default=d.minutes,
                   help="time budget of the feature mining (what is mined by then is used)")
    p.add_argument("--max-false-accept", type=float, default=d.max_false_accept,
                   help="share of not-acceptable held-out swaps the threshold may accept")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def default_out(target: str) -> str:
    from vllm_spec_plugins.models import judges_root

    return str(judges_root() / os.path.basename(target.rstrip("/")))


def run_from_args(args) -> int:
    for name in ("max_tokens", "per_task", "window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.code_tasks < 0 or args.math_tasks < 0 or args.code_tasks + args.math_tasks < 1:
        raise ValueError("--code-tasks and --math-tasks must be >= 0, together >= 1")
    if not 0.0 <= args.max_false_accept < 1.0:
        raise ValueError("--max-false-accept must be in [0, 1)")
    if args.minutes <= 0:
        raise ValueError("--minutes must be > 0")
    s = JudgeTrainSettings(target=args.target, out=args.out or default_out(args.target),
                           draft_model=args.draft_model, code_tasks=args.code_tasks,
                           math_tasks=args.math_tasks, max_tokens=args.max_tokens,
                           per_task=args.per_task, window=args.window, dtype=args.dtype,
                           minutes=args.minutes, max_false_accept=args.max_false_accept,
                           seed=args.seed, progress=not args.quiet)
    train_judge(s)
    return 0
