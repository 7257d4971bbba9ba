"""Lossy scorers inside vLLM's verification step (any proposer).

Two patches (declared in patches.py, installed by ``register()`` in every
process; both pass straight through unless the engine's
``additional_config.spec_plugins_scorer`` names a lossy scorer):

* ``GPUModelRunner.sample_tokens``: before vLLM clears it, read what this
  step's forward pass left (the spec-decode metadata and the final hidden
  states of the sampled rows), which rows are lossy (the deployment's mode
  and each request's ``extra_args["spec_lossy"]``) and, for reflective rows,
  how their drafts were extended; make that the step's current batch.
* ``rejection_sampler.rejection_sample``: run vLLM's standard rule, then
  :func:`vllm_spec_plugins.scorers.base.relaxed_chains` on the lossy rows.
  Lossless rows keep vLLM's result untouched. Bonus sampling, logits
  processors and logprobs stay vLLM's.

A scorer failure (a bad head, an exception in a step) costs nothing but the
relaxation: the step keeps the standard result and the scorer is counted as
failed (after 3 failures in a row it is switched off, with a warning).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

import torch

from vllm_spec_plugins.engine_config import SCORER_KEY, request_lossy, scorer_config

from .server_metrics import MetricsFileWriter

logger = logging.getLogger("vllm_spec_plugins")

#: Per-request counters kept for at most this many requests (oldest dropped).
MAX_TRACKED_REQUESTS = 4096
MAX_FAILURES_IN_A_ROW = 3

_local = threading.local()


def build_scorer(cfg: Any, model_config: Any = None) -> Any:
    """The scorer object of a validated ScorerConfig (tokenizes the reflective
    probe with the target's tokenizer)."""
    from vllm_spec_plugins.scorers.base import StandardScorer

    if cfg is None or cfg.name == "standard":
        return StandardScorer()
    if cfg.name == "judge":
        from vllm_spec_plugins.scorers.judge import JudgeScorer, load_head, resolve_head_path

        head = load_head(resolve_head_path(cfg.head or _model_name(model_config)))
        return JudgeScorer(head, cfg.threshold, cfg.min_target_prob)
    from vllm_spec_plugins.scorers.reflective import ReflectiveScorer

    return ReflectiveScorer(probe_token_ids(cfg.probe, model_config), cfg.fusion_weight,
                            cfg.min_target_prob)


def _model_name(model_config: Any) -> str:
    import os

    name = str(getattr(model_config, "model", "") or "")
    return os.path.basename(os.path.dirname(name.rstrip("/"))) if name.rstrip("/").endswith(
        "/hf") else os.path.basename(name.rstrip("/"))


def probe_token_ids(probe: str, model_config: Any) -> list[int]:
    from transformers import AutoTokenizer

    path = getattr(model_config, "tokenizer", None) or getattr(model_config, "model", None)
    tok = AutoTokenizer.from_pretrained(path)
    return list(tok.encode(probe, add_special_tokens=False))


@dataclass
class _StepSignals:
    """What sample_tokens saw; read by the patched rejection_sample."""

    lossy: list[bool]
    req_ids: list
    hidden: Optional[torch.Tensor]
    target_idx: Optional[torch.Tensor]
    bonus_idx: Optional[torch.Tensor]
    reflected: list[int]          # per row: real draft length if extended, else -1


class ScorerRuntime:
    """One engine's scorer: its settings, counters and the current step."""

    def __init__(self, cfg: Any, scorer: Any) -> None:
        self.cfg = cfg
        self.scorer = scorer
        self.enabled = not scorer.lossless
        self.generator = torch.Generator().manual_seed(0)
        self.extended: dict[str, int] = {}   # req_id -> real draft length (reflective)
        self.per_request: OrderedDict[str, list[int]] = OrderedDict()
        self.stats = {"steps": 0, "lossy_rows": 0, "lossless_rows": 0, "drafted_tokens": 0,
                      "standard_accepted": 0, "scorer_accepted": 0, "errors": 0,
                      "seconds": 0.0, "disabled": 0,
                      # lossy rows verified as sent: vLLM's own rule vs the relaxed one
                      "vllm_rule_accepted": 0, "relaxed_accepted": 0}
        self._failures = 0
        self.metrics_file = MetricsFileWriter(name="scorer")

    # -- reflective: extend the drafts of lossy rows ----------------------------
    @property
    def reflects(self) -> bool:
        return self.enabled and getattr(self.scorer, "needs_reflection", False)

    def draft_cap(self, k: int) -> int:
        from vllm_spec_plugins.scorers.reflective import max_real_draft

        return max_real_draft(k, len(self.scorer.probe_ids))

    def extend_drafts(self, runner: Any, drafts: list[list[int]], k: int) -> list[list[int]]:
        """Extend each lossy row's draft (cut to fit ``k``) with the probe and a copy."""
        from vllm_spec_plugins.scorers.reflective import extend_draft

        req_ids = runner.input_batch.req_ids
        cap = self.draft_cap(k)
        # This step's capture already took last step's entries: start afresh, so
        # a request that finished or was aborted leaves nothing behind.
        self.extended = {}
        out = []
        for i, d in enumerate(drafts):
            rid = req_ids[i] if i < len(req_ids) else None
            if rid is None or not d or cap < 1 or not self._row_lossy(runner, rid):
                out.append(d)
                continue
            d = list(d[:cap])
            self.extended[rid] = len(d)
            out.append(extend_draft(d, self.scorer.probe_ids))
        return out

    # -- sample_tokens ----------------------------------------------------------
    def _row_lossy(self, runner: Any, req_id: str) -> bool:
        req = getattr(runner, "requests", {}).get(req_id)
        sp = getattr(req, "sampling_params", None)
        return request_lossy(getattr(sp, "extra_args", None), self.cfg.requests)

    def capture(self, runner: Any) -> Optional[_StepSignals]:
        state = getattr(runner, "execute_model_state", None)
        meta = getattr(state, "spec_decode_metadata", None) if state is not None else None
        if not self.enabled or meta is None:
            return None
        req_ids = list(runner.input_batch.req_ids)
        lossy = [rid is not None and self._row_lossy(runner, rid) for rid in req_ids]
        if not any(lossy):
            return None
        reflected = [-1] * len(req_ids)
        if self.reflects:
            for i, rid in enumerate(req_ids):
                n = self.extended.pop(rid, -1) if rid is not None else -1
                reflected[i] = n
                if n < 0:
                    lossy[i] = False  # nothing to reflect on: standard rule
        hidden = tidx = bidx = None
        if getattr(self.scorer, "needs_hidden_states", False):
            hidden = state.sample_hidden_states
            tidx, bidx = meta.target_logits_indices, meta.bonus_logits_indices
        return _StepSignals(lossy, req_ids, hidden, tidx, bidx, reflected)

    # -- rejection_sample -------------------------------------------------------
    def rescore(self, signals: _StepSignals, output: torch.Tensor, draft_token_ids: torch.Tensor,
                num_draft_tokens: list[int], target_logits: torch.Tensor,
                bonus_token_ids: torch.Tensor, sampling_metadata: Any) -> torch.Tensor:
        t0 = time.perf_counter()
        try:
            result = self._rescore(signals, output, draft_token_ids, num_draft_tokens,
                                   target_logits, bonus_token_ids, sampling_metadata)
            self._failures = 0
            return result
        except Exception:
            self.stats["errors"] += 1
            self._failures += 1
            logger.warning("vllm-spec-plugins: the %s scorer failed this step; the step keeps "
                           "standard verification:\n%s", self.scorer.name, traceback.format_exc())
            if self._failures >= MAX_FAILURES_IN_A_ROW:
                self.enabled = False
                self.stats["disabled"] = 1
                logger.warning("vllm-spec-plugins: the %s scorer failed %d steps in a row and is "
                               "switched off: verification is standard (lossless) from now on",
                               self.scorer.name, self._failures)
            return output
        finally:
            self.stats["seconds"] += time.perf_counter() - t0
            self.stats["steps"] += 1
            self.metrics_file.maybe_write(self.prometheus_counters)

    def _rescore(self, sig: _StepSignals, output, draft_token_ids, num_draft_tokens,
                 target_logits, bonus_token_ids, sampling_metadata) -> torch.Tensor:
        from vllm_spec_plugins.scorers.base import VerifyBatch, standard_count, relaxed_chains

        B = len(num_draft_tokens)
        if B != len(sig.lossy):
            raise RuntimeError(f"batch of {B} rows, but sample_tokens saw {len(sig.lossy)}")
        if sampling_metadata.all_greedy:
            greedy = torch.ones(B, dtype=torch.bool)
        elif sampling_metadata.all_random:
            greedy = torch.zeros(B, dtype=torch.bool)
        else:
            greedy = (sampling_metadata.temperature.to("cpu") == 0)[:B]
        counts = [int(n) for n in num_draft_tokens]
        if not any(n and lossy for n, lossy in zip(counts, sig.lossy)):
            return output  # no lossy row has a draft this step
        starts, acc = [], 0
        for n in counts:
            starts.append(acc)
            acc += n
        drafts = draft_token_ids.to("cpu")
        lossy = torch.tensor(sig.lossy, dtype=torch.bool)
        if self.reflects:
            batch = self._reflective_batch(sig, counts, starts, drafts, target_logits, output,
                                           greedy, lossy)
            rebuild = torch.tensor([n >= 0 for n in sig.reflected], dtype=torch.bool)
            batch.rebuild = rebuild
        else:
            batch = VerifyBatch(drafts, counts, target_logits, output, greedy, lossy,
                                bonus_token_ids=bonus_token_ids.to("cpu").reshape(-1))
            if sig.hidden is not None:
                tidx = sig.target_idx.to(sig.hidden.device).long()
                post = torch.empty_like(tidx)
                if len(tidx):
                    post[:-1] = tidx[1:]
                bidx = sig.bonus_idx.to(tidx.device).long()
                for b, (s, n) in enumerate(zip(starts, counts)):
                    if n:
                        post[s + n - 1] = bidx[b]
                batch.hidden_pre = sig.hidden[tidx].to("cpu")
                batch.hidden_post = sig.hidden[post].to("cpu")
            rebuild = None
        ok = self.scorer.acceptable(batch)
        res = relaxed_chains(batch, ok, self.generator, rebuild=rebuild)
        self._count(sig, batch, res)
        # What vLLM's own rule accepted on the same drafts (rows it verified as sent).
        for b in range(B):
            if bool(batch.lossy[b]) and (rebuild is None or not bool(rebuild[b])):
                self.stats["vllm_rule_accepted"] += min(counts[b], standard_count(output[b].cpu()))
                self.stats["relaxed_accepted"] += res.standard_accepted[b] + res.scorer_accepted[b]
        out = res.output.to(output.device)
        if out.shape != output.shape:
            raise RuntimeError(f"relaxed output {tuple(out.shape)} != {tuple(output.shape)}")
        return out

    def _reflective_batch(self, sig: _StepSignals, counts, starts, drafts, target_logits,
                          output, greedy, lossy):
        """The extended rows seen as their real drafts, with the reflective and
        the after-the-draft distributions taken from the extended chain."""
        from vllm_spec_plugins.scorers.base import VerifyBatch

        m = len(self.scorer.probe_ids)
        orig_rows, refl_rows, real_counts, next_rows = [], [], [], []
        for b, (s, n) in enumerate(zip(starts, counts)):
            r = sig.reflected[b]
            if r >= 0 and n == 2 * r + m:
                orig_rows += range(s, s + r)
                refl_rows += range(s + r + m, s + 2 * r + m)
                next_rows.append(s + r)
                real_counts.append(r)
            else:
                if r >= 0:  # not what we sent (cut by the scheduler?): standard rule
                    sig.reflected[b] = -1
                    lossy[b] = False
                orig_rows += range(s, s + n)
                refl_rows += range(s, s + n)
                next_rows.append(0)  # never read: the row is not walked
                real_counts.append(n)
        idx = torch.tensor(orig_rows, dtype=torch.long)
        ridx = torch.tensor(refl_rows, dtype=torch.long)
        dev = target_logits.device
        nidx = torch.tensor(next_rows, dtype=torch.long, device=dev)
        return VerifyBatch(drafts[idx], real_counts, target_logits[idx.to(dev)], output, greedy,
                           lossy, next_logits=target_logits[nidx],
                           reflective_logits=target_logits[ridx.to(dev)])

    def _count(self, sig: _StepSignals, batch: Any, res: Any) -> None:
        s = self.stats
        for b, rid in enumerate(sig.req_ids):
            if rid is None:
                continue
            n = int(batch.num_draft_tokens[b])
            std, extra = int(res.standard_accepted[b]), int(res.scorer_accepted[b])
            s["lossy_rows" if bool(batch.lossy[b]) else "lossless_rows"] += 1
            s["drafted_tokens"] += n
            s["standard_accepted"] += std
            s["scorer_accepted"] += extra
            rec = self.per_request.get(rid)
            if rec is None:
                rec = self.per_request[rid] = [0, 0, 0, int(bool(batch.lossy[b]))]
                while len(self.per_request) > MAX_TRACKED_REQUESTS:
                    self.per_request.popitem(last=False)
            rec[0] += std
            rec[1] += extra
            rec[2] += n

    # -- diagnostics ------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        s = dict(self.stats)
        s["scorer"] = self.scorer.describe()
        s["enabled"] = self.enabled
        s["requests_mode"] = self.cfg.requests
        s["per_request"] = {rid: {"standard_accepted": r[0], "scorer_accepted": r[1],
                                  "drafted_tokens": r[2], "lossy": bool(r[3])}
                            for rid, r in self.per_request.items()}
        return s

    def prometheus_counters(self) -> list:
        m = {"scorer": self.scorer.name}
        s = self.stats
        return [
            ("vsp_scorer_accepted_tokens_total",
             "Draft tokens accepted, by the standard rule or only by the lossy scorer",
             {**m, "rule": "standard"}, s["standard_accepted"]),
            ("vsp_scorer_accepted_tokens_total",
             "Draft tokens accepted, by the standard rule or only by the lossy scorer",
             {**m, "rule": "scorer"}, s["scorer_accepted"]),
            ("vsp_scorer_rows_total", "Verified rows, lossy or lossless (request opted out)",
             {**m, "mode": "lossy"}, s["lossy_rows"]),
            ("vsp_scorer_rows_total", "Verified rows, lossy or lossless (request opted out)",
             {**m, "mode": "lossless"}, s["lossless_rows"]),
            ("vsp_scorer_errors_total", "Scorer failures (the step kept standard verification)",
             m, s["errors"]),
        ]


# ----------------------------------------------------------------------------- runner glue
_NO_SCORER = object()


def runtime_of(runner: Any) -> Optional[ScorerRuntime]:
    """The runner's scorer runtime, built on first use; None = standard rule."""
    rt = runner.__dict__.get("_vsp_scorer", None)
    if rt is None:
        rt = _build_runtime(runner)
        runner.__dict__["_vsp_scorer"] = rt
    return None if rt is _NO_SCORER else rt


def _build_runtime(runner: Any) -> Any:
    vllm_config = getattr(runner, "vllm_config", None)
    extra = getattr(vllm_config, "additional_config", None) or {}
    if SCORER_KEY not in extra:
        return _NO_SCORER
    try:
        cfg = scorer_config(extra)
        scorer = build_scorer(cfg, getattr(vllm_config, "model_config", None))
    except Exception:
        logger.error("vllm-spec-plugins: the scorer could not be built; verification stays "
                     "standard (lossless):\n%s", traceback.format_exc())
        return _NO_SCORER
    if scorer.lossless:
        return _NO_SCORER
    logger.warning("vllm-spec-plugins: LOSSY scorer %r is on (requests: %s): outputs of the "
                   "requests it applies to are NOT identical to the target model's own. A "
                   "request opts out with extra_args / vllm_xargs {\"spec_lossy\": false}.",
                   scorer.name, cfg.requests)
    return ScorerRuntime(cfg, scorer)


def on_sample_tokens(runner: Any) -> None:
    """Called first thing in sample_tokens: this step's signals become current."""
    _local.current = None
    rt = runtime_of(runner)
    if rt is None:
        return
    try:
        sig = rt.capture(runner)
    except Exception:
        rt.stats["errors"] += 1
        logger.warning("vllm-spec-plugins: reading the scorer's signals failed; this step "
                       "keeps standard verification:\n%s", traceback.format_exc())
        return
    if sig is not None:
        _local.current = (rt, sig)


def after_sample_tokens() -> None:
    _local.current = None


def relax(output: torch.Tensor, draft_token_ids, num_draft_tokens, target_logits,
          bonus_token_ids, sampling_metadata) -> torch.Tensor:
    """Called by the patched rejection_sample with vLLM's standard result."""
    cur = getattr(_local, "current", None)
    if cur is None:
        return output
    _local.current = None  # one verification per step
    rt, sig = cur
    return rt.rescore(sig, output, draft_token_ids, num_draft_tokens, target_logits,
                      bonus_token_ids, sampling_metadata)


def scorer_snapshot_of(runner: Any) -> Optional[dict]:
    rt = runtime_of(runner)  # built here if no step has run yet
    return rt.snapshot() if rt is not None else None
