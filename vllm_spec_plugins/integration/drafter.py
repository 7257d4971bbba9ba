"""``PluginDrafter``: the class vLLM's custom-proposer path builds in each worker.

It adapts vLLM's ``propose(sampled_token_ids, num_tokens_no_spec,
token_ids_cpu)`` to a ``Proposer`` (proposers/base.py) and wires the shared
layer around it: the request table (lifecycle.py), the background thread and
proposer lock (background.py), target signals (target_signals.py), step timing
(step_timing.py), state files (state_files.py) and replica sharing
(replica_sharing.py). The runner patches (patches.py) call the ``on_*`` hooks.

The step thread never waits: if a background job holds the proposer, that
step drafts nothing (lossless) and lifecycle work is caught up on the next.
A proposer failure costs its request's drafts, never the request.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

import numpy as np

from vllm_spec_plugins.engine_config import (
    CONFIG_KEY,
    VLLM_MAX_SPEC_LEN,
    PluginConfigError,
    check_num_speculative_tokens,
    draft_budget_config,
    sharing_config,
)
from vllm_spec_plugins.proposers.base import ScoredDraft

from .background import BackgroundWork
from .draft_budget import DraftBudget
from .lifecycle import RequestTable
from .replica_sharing import ReplicaSharing, current_ranks, owns_replica_state
from . import scoring
from .server_metrics import MetricsFileWriter
from .state_files import StateSaver, check_draft_models, check_made_for, check_state_paths
from .step_timing import StepTimer
from .target_signals import TargetTopK
from .versions import require_supported_vllm

logger = logging.getLogger("vllm_spec_plugins")


class PluginDrafter:
    """Adapter between vLLM's custom proposer hook and a ``Proposer``."""

    #: Save the proposer's state files every this many finished requests.
    autosave_every = 256

    def __init__(self, vllm_config: Any, *, patch_runner: bool = True,
                 ranks: tuple[int, int, int] | None = None) -> None:
        require_supported_vllm()
        from vllm_spec_plugins.registry import resolve

        spec = vllm_config.speculative_config
        extra = getattr(vllm_config, "additional_config", None) or {}
        try:
            self.num_speculative_tokens = check_num_speculative_tokens(
                spec.num_speculative_tokens)
            self.method, entry, self.config = resolve(extra.get(CONFIG_KEY))
            check_state_paths(self.config)
            check_draft_models(self.config)
            self.proposer = entry.proposer_cls()(self.config, self.num_speculative_tokens)
            share = sharing_config(extra)
            budget_config = draft_budget_config(extra.get(CONFIG_KEY))
            check_state_paths(budget_config, prefix="draft_budget.")
        except PluginConfigError as e:
            # vLLM wraps this in "Failed to instantiate custom proposer": keep ours first.
            raise ValueError(f"vllm-spec-plugins: {e}") from None
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        self._check_vocab(vllm_config.model_config)
        self.owner = owns_replica_state(*(ranks or current_ranks()))
        self.background = BackgroundWork()
        self.requests = RequestTable(self.proposer, self.background)
        self.timer = StepTimer()
        self.proposer.set_step_cost(self.timer.model)
        try:
            self.budget = DraftBudget(budget_config, self.timer.model, method=self.method)
        except ValueError as e:  # its state file is another method's, or damaged
            raise ValueError(f"vllm-spec-plugins: additional_config.{CONFIG_KEY}."
                             f"draft_budget.state_path: {e}") from None
        #: {request id: draft tokens scheduled for verification} of the running step.
        self._verifying: dict = {}
        self.topk = TargetTopK(getattr(self.proposer, "target_topk", 0) or 0)
        self.saver = StateSaver(self.proposer, self.background, self.autosave_every,
                                enabled=self.owner, after_save=self._release_deferred,
                                also_save=(self.budget.save_state,))
        self.sharing = None
        if share is not None and self.owner:
            from vllm_spec_plugins.sharing import HubClient

            self.sharing = ReplicaSharing(HubClient(share), self.proposer, self.background,
                                          after_merge=self._release_deferred)
        self._runner: Any = None
        self._step_budget = 0
        self.metrics_file = MetricsFileWriter()
        self.stats = {"steps": 0, "rows": 0, "drafted_tokens": 0, "propose_seconds": 0.0,
                      "errors": 0, "busy_steps": 0}
        if patch_runner:
            from .patches import RUNNER_PATCHES, apply_patches

            apply_patches(RUNNER_PATCHES)
        logger.info("vllm-spec-plugins: method=%s k=%d config=%s", self.method,
                    self.num_speculative_tokens, self.config.model_dump())

    def _check_vocab(self, model_config: Any) -> None:
        """A proposer with a model of its own (``vocab_size``) must draft ids
        of the target's vocabulary."""
        mine = getattr(self.proposer, "vocab_size", None)
        get = getattr(model_config, "get_vocab_size", None)
        if mine is None or get is None:
            return
        target = int(get())
        if int(mine) != target:
            raise ValueError(
                f"vllm-spec-plugins: additional_config.{CONFIG_KEY}: method {self.method!r} "
                f"drafts with a model of vocabulary size {mine}, the target's is {target}; "
                "use a draft model with the target's tokenizer")
        self._check_made_for(model_config)

    def _check_made_for(self, model_config: Any) -> None:
        """A drafter trained for one target (``made_for_target``) must serve
        that target (see state_files.check_made_for)."""
        made = getattr(self.proposer, "made_for_target", None)
        if made:
            try:
                check_made_for(made, model_config, self.method)
            except PluginConfigError as e:
                raise ValueError(f"vllm-spec-plugins: {e}") from None

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model; compile the proposer's kernels before serving."""
        self.proposer.warmup()

    # -- hooks called by the runner patches ------------------------------------
    def on_step_start(self, runner: Any, scheduler_output: Any) -> None:
        """A step begins: time the last one, release finished/aborted requests."""
        self._runner = runner
        self.timer.on_step_start(scheduler_output)
        self._verifying = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
        for req_id in getattr(scheduler_output, "finished_req_ids", None) or ():
            self.requests.finish(req_id)
        # A step with nothing scheduled is the engine going idle: no further
        # step comes, so what this one cannot do now goes to the background.
        idle = not getattr(scheduler_output, "total_num_scheduled_tokens", 1)
        lock = self.background.proposer_lock
        if len(self.requests):
            released = False
            if lock.acquire(blocking=False):
                try:
                    self._release_deferred()
                    released = not self.requests.unreleased
                finally:
                    lock.release()
            if idle and not released and self.requests.unreleased:
                # No later step will come: the background thread releases them
                # (after any state it is still building: its jobs run in order).
                self.background.submit_locked("releasing finished requests",
                                              self._release_deferred)
        if self.sharing is not None:
            # Idle: push what the last requests taught now, not next time.
            self.sharing.tick(force=idle)
        if idle:
            self.metrics_file.maybe_write(self.prometheus_counters, force=True)

    def on_draft_call(self, runner: Any, scheduler_output: Any) -> None:
        self._runner = runner
        self._step_budget = int(getattr(scheduler_output, "num_spec_tokens_to_schedule", 0)
                                or 0)

    def on_target_logits(self, runner: Any, logits: Any, spec_decode_metadata: Any) -> None:
        if self.topk.width > 0:
            self.topk.capture(runner.input_batch.req_ids, logits, spec_decode_metadata)

    def _release_deferred(self) -> None:
        """With the proposer lock held: release finished requests (the proposer
        learns from them) and count them for autosave."""
        self.saver.on_finished(self.requests.release_finished())

    # -- the per-step hook vLLM calls --------------------------------------------
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any
                ) -> list[list[int]]:
        t0 = time.perf_counter()
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        for sampled in sampled_token_ids:
            self.timer.output_tokens += len(sampled)
        runner = self._runner
        lock = self.background.proposer_lock
        if runner is None:  # patches not active (should not happen): draft nothing
            return drafts
        if not lock.acquire(blocking=False):
            self.stats["busy_steps"] += 1  # a background job holds the proposer
            self.topk.clear()
            return drafts
        try:
            self._release_deferred()
            scorer = scoring.runtime_of(runner)
            reflect = scorer if scorer is not None and scorer.reflects else None
            self._draft(runner.input_batch, sampled_token_ids, num_tokens_no_spec,
                        token_ids_cpu, drafts, reflect)
            if reflect is not None:  # the reflective scorer verifies d + probe + d
                drafts = reflect.extend_drafts(runner, drafts, self.num_speculative_tokens)
        except Exception:  # the adapter itself: never take the engine down
            self.stats["errors"] += 1
            logger.warning("vllm-spec-plugins: drafting failed this step (no drafts):\n%s",
                           traceback.format_exc())
            drafts = [[] for _ in sampled_token_ids]
        finally:
            lock.release()
            self.stats["steps"] += 1
            self.stats["propose_seconds"] += time.perf_counter() - t0
        self.metrics_file.maybe_write(self.prometheus_counters)
        return drafts

    def prometheus_counters(self) -> list:
        """(name, help, labels, value) for the server's /metrics (server_metrics.py)."""
        m = {"method": self.method}
        b = self.budget.stats
        out = [("vsp_drafter_steps_total", "Drafting calls of the engine steps", m,
                self.stats["steps"]),
               ("vsp_drafter_drafted_tokens_total", "Draft tokens sent for verification", m,
                self.stats["drafted_tokens"]),
               ("vsp_drafter_errors_total", "Proposer failures (each cost drafts, no request)",
                m, self.stats["errors"] + self.requests.stats["errors"])]
        for stage, key in (("proposed", "proposed_tokens"), ("kept", "kept_tokens"),
                           ("accepted", "accepted_tokens")):
            out.append(("vsp_draft_budget_tokens_total",
                        "Draft tokens the method proposed, the budget kept, the target accepted",
                        {**m, "stage": stage}, b[key]))
        try:
            out += [(n, d, {**m, **lab}, v) for n, d, lab, v in self.proposer.prometheus_counters()]
        except Exception:  # diagnostics must never break a step
            pass
        return out

    def _draft(self, batch: Any, sampled_token_ids, num_tokens_no_spec, token_ids_cpu,
               drafts: list[list[int]], reflect: Any = None) -> None:
        table, proposer = self.requests, self.proposer
        budget = self.num_speculative_tokens
        if self._step_budget > 0:
            budget = min(budget, self._step_budget)
        budget = min(budget, VLLM_MAX_SPEC_LEN)
        draft_budget = self.budget
        verifying = self._verifying
        rows, recs, work = [], [], []
        for i, sampled in enumerate(sampled_token_ids):
            req_id = batch.req_ids[i] if sampled else None  # [] = chunked prefill running
            if req_id is None:
                continue
            n = int(num_tokens_no_spec[i])
            rec = table.get(req_id)
            if rec is None:
                n_prompt = int(batch.num_prompt_tokens[i])
                rec = table.start(req_id, token_ids_cpu[i, :n_prompt])
            if not table.poll(rec):
                continue
            if rec.last_draft is not None:
                # What the engine made of this row's last draft: it feeds the calibration.
                draft_budget.observe(rec.last_draft, len(verifying.get(req_id, ())),
                                     len(sampled) - 1)
                rec.last_draft = None
            try:
                if self.topk.width:
                    window = self.topk.take(req_id, token_ids_cpu[i], n, len(sampled))
                    if window is not None:
                        proposer.on_target_topk(rec.state, *window)
                if n > rec.num_seen:
                    proposer.on_tokens(rec.state, token_ids_cpu[i, rec.num_seen:n].copy())
                    rec.num_seen = n
            except Exception:
                table.fail(rec, "on_target_topk/on_tokens")
                continue
            k = min(budget, self.max_model_len - n - 1)
            if reflect is not None and reflect._row_lossy(self._runner, req_id):
                k = min(k, reflect.draft_cap(budget))  # room for the probe and the copy
            if k > 0:
                rows.append(i)
                recs.append(rec)
                work.append((rec.state, token_ids_cpu[i, :n], k))
        if not work:
            return
        price = draft_budget.step_price(len(sampled_token_ids))
        ask = price if draft_budget.enabled else None
        try:
            out = proposer.propose_scored_batch(work, ask)
        except Exception:
            # One bad row must not cost the others their drafts: retry row by row.
            out = []
            for rec, row in zip(recs, work):
                try:
                    out.append(proposer.propose_scored_batch([row], ask)[0])
                except Exception:
                    table.fail(rec, "propose")
                    out.append(ScoredDraft([]))
        for i, rec, (_, _, k), d in zip(rows, recs, work, out):
            drafts[i], rec.last_draft = draft_budget.cut(d, price, k)
            self.stats["drafted_tokens"] += len(drafts[i])
        self.stats["rows"] += len(work)

    # -- diagnostics -----------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        try:  # a proposer's own diagnostics (e.g. the hybrid's choice counts)
            stats = getattr(self.proposer, "stats", None)
        except Exception:  # diagnostics must never break the snapshot
            stats = None
        return {"method": self.method, "tracked_requests": len(self.requests),
                "requests": dict(self.requests.stats),
                "proposer_stats": dict(stats) if isinstance(stats, dict) else None,
                "sharing": self.sharing.stats() if self.sharing is not None else None,
                "owner_rank": self.owner,
                "step_cost": self.timer.model.stats,
                "draft_budget": self.budget.snapshot(),
                "background": {"jobs": self.background.jobs,
                               "errors": self.background.errors,
                               "saves": self.saver.saves},
                "capture_seconds": self.topk.seconds, "captured_rows": self.topk.rows,
                **self.stats,
                "errors": self.stats["errors"] + self.requests.stats["errors"]
                + self.topk.errors}
