"""Judge scorer: a small trained head says whether a draft token is acceptable.

After Judge Decoding (arXiv 2501.19309) and AutoJudge's automatic labels:
a logistic head over the target's final hidden states around a draft token
(the state that predicted it and the state after reading it) plus four
numbers from the target's distribution there (log p of the draft token, of
the target's own top token, their difference, the entropy). A token is
accepted when the head's probability reaches the head's threshold OR the
standard rule accepts it (``base.relaxed_chains``).

A head is a directory: ``judge.json`` (format, the target it was trained on,
threshold, what it was trained on) and ``judge.safetensors`` (weights and the
feature normalisation). ``train-judge`` (``judge_training.py``) makes one.
Plain torch, no vLLM import.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .base import Scorer, VerifyBatch

FORMAT = "vllm-spec-plugins/judge-head/1"
SPEC_FILE = "judge.json"
WEIGHTS_FILE = "judge.safetensors"
#: Features besides the two hidden states.
LOGIT_FEATURES = ("logp_draft", "logp_top", "logp_gap", "entropy")


class JudgeFormatError(ValueError):
    """A judge head that is missing, corrupt or not of this format."""


@dataclass
class JudgeTarget:
    """What the head was trained on (checked against the serving target)."""

    name: str
    architecture: str
    hidden_size: int
    vocab_size: int
    num_hidden_layers: int


@dataclass
class JudgeHead:
    weight: torch.Tensor     # [F]
    bias: float
    mean: torch.Tensor       # [F]
    std: torch.Tensor        # [F]
    threshold: float
    target: JudgeTarget
    training: dict = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        return self.target.hidden_size

    def probability(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float() - self.mean) / self.std
        return torch.sigmoid(x @ self.weight + self.bias)


def logit_features(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[T, 4]: log p(token), log p(top), their gap, entropy (see LOGIT_FEATURES)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    lp_tok = logp.gather(1, tokens.long().view(-1, 1)).squeeze(1)
    lp_top = logp.max(dim=-1).values
    ent = -(logp.exp() * logp.clamp_min(-1e4)).sum(dim=-1)
    return torch.stack([lp_tok, lp_top, lp_top - lp_tok, ent], dim=1)


def judge_features(hidden_pre: torch.Tensor, hidden_post: torch.Tensor,
                   logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """[T, 2H + 4]: the judge's input for T draft tokens."""
    return torch.cat([hidden_pre.float(), hidden_post.float(),
                      logit_features(logits, tokens)], dim=1)


class JudgeScorer(Scorer):
    name = "judge"
    lossless = False
    needs_hidden_states = True

    def __init__(self, head: JudgeHead, threshold: Optional[float] = None,
                 min_target_prob: float = 0.0) -> None:
        self.head = head
        self.threshold = float(head.threshold if threshold is None else threshold)
        # A floor under the head: never a token the target itself finds implausible
        # (the head learnt from one drafter's alternatives; a copy a suffix tree
        # proposes can look acceptable to it and start a loop).
        self.min_log_prob = math.log(min_target_prob) if min_target_prob > 0 else -math.inf

    def acceptable(self, batch: VerifyBatch) -> torch.Tensor:
        T = int(batch.draft_token_ids.shape[0])
        out = torch.zeros(T, dtype=torch.bool)
        if T == 0 or batch.hidden_pre is None or batch.hidden_post is None:
            return out
        idx = batch.consulted()
        if idx.numel() == 0:
            return out
        dev = batch.target_logits.device
        feats = judge_features(batch.hidden_pre[idx.to(batch.hidden_pre.device)],
                               batch.hidden_post[idx.to(batch.hidden_post.device)],
                               batch.target_logits[idx.to(dev)],
                               batch.draft_token_ids[idx.to(batch.draft_token_ids.device)])
        ok = self.head.probability(feats) >= self.threshold
        ok &= feats[:, -len(LOGIT_FEATURES)] >= self.min_log_prob  # logp_draft
        out[idx] = ok.to("cpu")
        return out

    def describe(self) -> dict:
        return {"name": self.name, "lossless": False, "threshold": self.threshold,
                "target": self.head.target.name,
                "min_target_prob": round(math.exp(self.min_log_prob), 6)}


# ----------------------------------------------------------------------------- files
def save_head(head: JudgeHead, directory: str | os.PathLike) -> str:
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    spec = {"format": FORMAT, "threshold": head.threshold, "bias": head.bias,
            "features": ["hidden_pre", "hidden_post", *LOGIT_FEATURES],
            "target": head.target.__dict__, "training": head.training}
    save_file({"weight": head.weight.float().contiguous(), "mean": head.mean.float().contiguous(),
               "std": head.std.float().contiguous()}, os.path.join(directory, WEIGHTS_FILE))
    tmp = os.path.join(directory, SPEC_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(spec, f, indent=1)
    os.replace(tmp, os.path.join(directory, SPEC_FILE))
    return str(directory)


def read_head_spec(directory: str | os.PathLike) -> dict:
    """The head's ``judge.json`` (checked), without loading the weights."""
    path = os.path.join(directory, SPEC_FILE)
    if not os.path.isfile(path):
        raise JudgeFormatError(f"no judge head at {str(directory)!r} (no {SPEC_FILE}); train one "
                               "with `vllm-spec-plugins train-judge --target MODEL`")
    try:
        with open(path) as f:
            spec = json.load(f)
        t = spec["target"]
        target = JudgeTarget(str(t["name"]), str(t["architecture"]), int(t["hidden_size"]),
                             int(t["vocab_size"]), int(t["num_hidden_layers"]))
        threshold = float(spec["threshold"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise JudgeFormatError(f"judge head {path!r} is corrupt ({type(e).__name__}: {e}); "
                               "train it again with `vllm-spec-plugins train-judge`") from None
    if spec.get("format") != FORMAT:
        raise JudgeFormatError(f"{path!r} is not a judge head of this version (format "
                               f"{spec.get('format')!r}, expected {FORMAT!r})")
    if not 0.0 < threshold < 1.0 or not math.isfinite(threshold):
        raise JudgeFormatError(f"{path!r}: threshold {threshold} is not in (0, 1)")
    if not os.path.isfile(os.path.join(directory, WEIGHTS_FILE)):
        raise JudgeFormatError(f"judge head {str(directory)!r} has no {WEIGHTS_FILE}; train it "
                               "again with `vllm-spec-plugins train-judge`")
    spec["_target"] = target
    return spec


def load_head(directory: str | os.PathLike) -> JudgeHead:
    from safetensors.torch import load_file

    spec = read_head_spec(directory)
    target: JudgeTarget = spec["_target"]
    try:
        w = load_file(os.path.join(directory, WEIGHTS_FILE))
        weight, mean, std = w["weight"].float(), w["mean"].float(), w["std"].float()
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same error
        raise JudgeFormatError(f"judge head weights in {str(directory)!r} are corrupt "
                               f"({type(e).__name__}: {e})") from None
    n = 2 * target.hidden_size + len(LOGIT_FEATURES)
    if not (weight.shape == mean.shape == std.shape == (n,)):
        raise JudgeFormatError(
            f"judge head {str(directory)!r}: weights have shape {tuple(weight.shape)}, expected "
            f"({n},) for hidden size {target.hidden_size}")
    return JudgeHead(weight, float(spec["bias"]), mean, std.clamp_min(1e-6), float(spec["threshold"]),
                     target, dict(spec.get("training") or {}))


def resolve_head_path(name_or_path: str) -> str:
    """A head's directory: the path itself if it holds judge.json or contains a
    separator, else that name under the judges folder (train-judge's default)."""
    from vllm_spec_plugins import models

    p = os.path.expanduser(name_or_path)
    if os.path.isfile(os.path.join(p, SPEC_FILE)) or os.sep in name_or_path:
        return p
    return str(models.judges_root() / name_or_path)


def made_for(spec: dict) -> dict[str, Any]:
    t: JudgeTarget = spec["_target"]
    return {"name": t.name, "architecture": t.architecture, "hidden_size": t.hidden_size,
            "vocab_size": t.vocab_size, "num_hidden_layers": t.num_hidden_layers}
