"""Every change this plugin makes to vLLM, declared in one place.

A :class:`VllmPatch` names its target (module, class, attribute), the vLLM
versions it was written for, and how to build the replacement from the
original. :func:`apply_patches` applies a group of them:

* all targets are resolved and their originals captured before any is
  replaced (a failure half-way leaves vLLM untouched);
* a patch already applied (by this or an earlier import of this module) is
  recognised by the mark it leaves on the target, so applying is idempotent;
* a target that another plugin already replaced is refused loudly, naming it
  (wrapping someone else's wrapper would silently change what both do);
* each applied patch records itself on its owner (``__vsp_patches__``: name
  -> versions) for anyone debugging what was changed.

The replacements themselves are thin: they hand the runner's state to the
drafter (drafter.py) and call the original. When vLLM changes, this file and
the version list in versions.py change.
"""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable

from .versions import SUPPORTED_VLLM_VERSIONS

#: Attribute set on every replacement: the name of the patch that made it.
PATCH_MARK = "__vsp_patch__"
#: Attribute set on the owner (class or module): {patch name: versions}.
OWNER_RECORD = "__vsp_patches__"

_LOCK = threading.Lock()


class PatchConflictError(RuntimeError):
    """Another plugin already replaced an attribute this plugin must patch."""


@dataclass(frozen=True)
class VllmPatch:
    name: str
    module: str                       # e.g. "vllm.v1.worker.gpu_model_runner"
    owner: str                        # class name in that module ("" = the module itself)
    attribute: str                    # the function replaced
    make: Callable[[Callable], Callable]  # original -> replacement
    versions: tuple[str, ...] = SUPPORTED_VLLM_VERSIONS
    why: str = ""
    #: Apply only where this returns True (e.g. a bug fix for one platform).
    applies: Callable[[], bool] = lambda: True

    @property
    def target(self) -> str:
        return ".".join(x for x in (self.module, self.owner, self.attribute) if x)

    def resolve_owner(self) -> Any:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.owner) if self.owner else mod


def _is_original(fn: Any, patch: VllmPatch) -> bool:
    """Does ``fn`` look like the function vLLM itself defines there?

    A ``functools.wraps`` wrapper is someone else's, except the decorators
    vLLM itself applies (``@torch.inference_mode`` on ``sample_tokens``):
    their wrapper code lives in torch or vLLM."""
    if getattr(fn, "__wrapped__", None) is not None:
        code = getattr(fn, "__code__", None)
        where = os.path.normpath(getattr(code, "co_filename", "") or "").split(os.sep)
        if not ("torch" in where or "vllm" in where):
            return False
        return _is_original(fn.__wrapped__, patch)
    module = getattr(fn, "__module__", "") or ""
    qualname = getattr(fn, "__qualname__", "") or ""
    return (module.split(".")[0] == patch.module.split(".")[0]
            and qualname.split(".")[-1] == patch.attribute)


def apply_patches(patches: list[VllmPatch]) -> list[str]:
    """Apply ``patches`` (see the module note); returns the names newly applied."""
    with _LOCK:
        todo: list[tuple[VllmPatch, Any, Callable]] = []
        for p in patches:
            if not p.applies():
                continue
            owner = p.resolve_owner()
            current = getattr(owner, p.attribute)
            mark = getattr(current, PATCH_MARK, None)
            if mark == p.name:
                continue  # applied already
            if mark is not None or not _is_original(current, p):
                by = mark or f"{getattr(current, '__module__', '?')}." \
                             f"{getattr(current, '__qualname__', repr(current))}"
                raise PatchConflictError(
                    f"vllm-spec-plugins cannot patch {p.target} ({p.why or p.name}): it was "
                    f"already replaced by {by} (another vLLM plugin?). Run without that "
                    "plugin (VLLM_PLUGINS=vllm_spec_plugins loads only this one).")
            todo.append((p, owner, current))
        # Every original is captured above: only now replace.
        for p, owner, original in todo:
            new = p.make(original)
            setattr(new, PATCH_MARK, p.name)
            new.__vsp_original__ = original  # type: ignore[attr-defined]
            setattr(owner, p.attribute, new)
            record = dict(getattr(owner, OWNER_RECORD, {}) or {})
            record[p.name] = p.versions
            setattr(owner, OWNER_RECORD, record)
        return [p.name for p, _, _ in todo]


def original_of(fn: Any) -> Any:
    """The vLLM function a patch replaced (``fn`` itself if not patched)."""
    return getattr(fn, "__vsp_original__", fn)


# ----------------------------------------------------------------------------
# The declared patches
# ----------------------------------------------------------------------------
def _validate_config(original: Callable) -> Callable:
    def create_engine_config(self, *args, **kwargs):
        cfg = original(self, *args, **kwargs)
        from .registration import validate_engine_config

        validate_engine_config(cfg)
        return cfg

    return create_engine_config


def _plugin_drafter(runner: Any):
    from .drafter import PluginDrafter

    drafter = getattr(runner, "drafter", None)
    return drafter if isinstance(drafter, PluginDrafter) else None


def _lifecycle(original: Callable) -> Callable:
    def _update_states(self, scheduler_output, *args, **kwargs):
        drafter = _plugin_drafter(self)
        if drafter is not None:
            drafter.on_step_start(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return _update_states


def _draft_budget(original: Callable) -> Callable:
    def propose_draft_token_ids(self, scheduler_output, *args, **kwargs):
        drafter = _plugin_drafter(self)
        if drafter is not None:
            drafter.on_draft_call(self, scheduler_output)
        return original(self, scheduler_output, *args, **kwargs)

    return propose_draft_token_ids


def _target_logits(original: Callable) -> Callable:
    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        drafter = _plugin_drafter(self)
        if drafter is not None:
            drafter.on_target_logits(self, logits, spec_decode_metadata)
        return original(self, logits, spec_decode_metadata, *args, **kwargs)

    return _sample


def _scorer_signals(original: Callable) -> Callable:
    def sample_tokens(self, *args, **kwargs):
        from . import scoring

        scoring.on_sample_tokens(self)
        try:
            return original(self, *args, **kwargs)
        finally:
            scoring.after_sample_tokens()

    return sample_tokens


def _scorer_rule(original: Callable) -> Callable:
    def rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                         draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                         *args, **kwargs):
        out = original(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                       draft_probs, target_logits, bonus_token_ids, sampling_metadata,
                       *args, **kwargs)
        from . import scoring

        return scoring.relax(out, draft_token_ids, num_draft_tokens, target_logits,
                             bonus_token_ids, sampling_metadata)

    return rejection_sample


def _torch_expand_kernel(original: Callable) -> Callable:
    from .vllm_cpu_fixes import expand_kernel_impl

    def _expand_kernel_impl(*args, **kwargs):
        return expand_kernel_impl(*args, **kwargs)

    return _expand_kernel_impl


def _cpu_build_with_the_bug() -> bool:
    from . import versions

    try:
        if not versions.is_supported(versions.installed_vllm_version()):
            return False  # a bug of 0.32.0's CPU build: never patch another release
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        return False


_RUNNER = "vllm.v1.worker.gpu_model_runner"  # the CPU runner inherits all three

#: Applied by register() in every vLLM process: fail bad settings in the user's process.
REGISTRATION_PATCHES = [
    VllmPatch("config-validation", "vllm.engine.arg_utils", "EngineArgs",
              "create_engine_config", _validate_config,
              why="LLM(...) and the OpenAI server build their config here: bad plugin "
                  "settings fail at startup naming the field, not inside a worker"),
    VllmPatch("cpu-expand-kernel", "vllm.utils.cpu_triton_utils", "", "_expand_kernel_impl",
              _torch_expand_kernel, applies=_cpu_build_with_the_bug,
              why="vLLM 0.32's CPU fallback never copies its result back, so sampling "
                  "with any proposer is verified against garbage temperatures "
                  "(vllm_cpu_fixes.py); the worker registers this attribute after "
                  "the plugins ran"),
]

#: Applied by register() in every vLLM process: the lossy scorers work with any
#: proposer (vLLM's built-in ones build no PluginDrafter), and pass straight
#: through unless additional_config.spec_plugins_scorer names a lossy scorer.
SCORER_PATCHES = [
    VllmPatch("scorer-signals", _RUNNER, "GPUModelRunner", "sample_tokens", _scorer_signals,
              why="the step's spec-decode metadata, final hidden states and per-request "
                  "lossy flags for a lossy scorer (vLLM clears them before sampling)"),
    VllmPatch("scorer-accept-rule", "vllm.v1.sample.rejection_sampler", "", "rejection_sample",
              _scorer_rule,
              why="a lossy scorer relaxes the accept rule of its requests after vLLM's "
                  "standard rule ran (bonus sampling, logits processors, logprobs unchanged)"),
]

#: Applied when a PluginDrafter is built (in the worker); do nothing for other drafters.
RUNNER_PATCHES = [
    VllmPatch("request-lifecycle", _RUNNER, "GPUModelRunner", "_update_states", _lifecycle,
              why="new, finished and aborted request ids reach the drafter (the "
                  "custom-proposer interface has none); step timing starts here"),
    VllmPatch("draft-budget", _RUNNER, "GPUModelRunner", "propose_draft_token_ids",
              _draft_budget, why="the scheduler's per-step draft budget and the runner "
                                 "(request ids by batch row) reach the drafter"),
    VllmPatch("target-logits", _RUNNER, "GPUModelRunner", "_sample", _target_logits,
              why="the target's logits of every verified position (top-k for Token "
                  "Recycling) without an extra forward pass"),
]
