"""The ``vllm.general_plugins`` entry point and startup validation.

``register()`` runs in every vLLM process (API server, engine core, workers,
Ray workers) before models are built. It must never raise: on an unsupported
vLLM it logs one warning and installs nothing (the drafter then refuses to be
built, with the full message, only where a config selects it).
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_spec_plugins.engine_config import (
    CONFIG_KEY,
    PluginConfigError,
    check_num_speculative_tokens,
    selects_plugin,
    sharing_config,
)

from . import versions

logger = logging.getLogger("vllm_spec_plugins")

_warned_unsupported = False


def register() -> None:
    """Entry point of the ``vllm.general_plugins`` group."""
    global _warned_unsupported
    try:
        usable = versions.plugin_usable()
    except Exception as e:  # noqa: BLE001 - vLLM not importable: nothing to patch
        logger.warning("vllm-spec-plugins: cannot read the vLLM version (%s); not installed", e)
        return
    if not usable:
        if not _warned_unsupported:
            _warned_unsupported = True
            logger.warning("%s The plugin installs nothing: engines that do not select it run "
                           "as usual; one that selects it fails at startup.",
                           versions.unsupported_message(versions.installed_vllm_version()))
        return
    from .patches import REGISTRATION_PATCHES, SCORER_PATCHES, apply_patches
    from .server_metrics import install_collector

    install_collector()  # the drafter's counters on the API server's /metrics

    try:
        apply_patches(REGISTRATION_PATCHES)
    except Exception as e:  # noqa: BLE001 - never break vLLM processes from here
        logger.warning("vllm-spec-plugins: startup checks not installed (%s); settings are "
                       "then checked when the drafter is built", e)
    try:
        apply_patches(SCORER_PATCHES)
    except Exception as e:  # noqa: BLE001
        logger.warning("vllm-spec-plugins: scorers not installed (%s): verification stays "
                       "standard", e)


def validate_engine_config(vllm_config: Any) -> None:
    """Fail at startup, in the user's process, with the field named.

    Without this a bad setting only surfaces inside the worker, and the user
    sees vLLM's generic "Engine core initialization failed"."""
    spec = getattr(vllm_config, "speculative_config", None)
    try:
        validate_scorer(vllm_config)
    except PluginConfigError as e:
        raise ValueError(f"vllm-spec-plugins: {e}") from None
    if spec is None or not selects_plugin(spec):
        return
    from vllm_spec_plugins.registry import resolve

    from .state_files import check_draft_models, check_made_for, check_state_paths, made_for_target

    extra = getattr(vllm_config, "additional_config", None) or {}
    try:
        check_num_speculative_tokens(spec.num_speculative_tokens)
        _, _, config = resolve(extra.get(CONFIG_KEY))
        check_state_paths(config)
        check_draft_models(config)
        check_made_for(made_for_target(config), getattr(vllm_config, "model_config", None),
                       extra[CONFIG_KEY]["method"])
        sharing_config(extra)
    except PluginConfigError as e:
        raise ValueError(f"vllm-spec-plugins: {e}") from None


def validate_scorer(vllm_config: Any) -> None:
    """The scorer settings (any proposer): the config itself, speculation on,
    reflective only with this package's proposers (it extends their drafts),
    the probe fitting num_speculative_tokens, the judge head readable and
    made for this target. Raises PluginConfigError naming the field."""
    from vllm_spec_plugins.engine_config import SCORER_KEY, scorer_config

    extra = getattr(vllm_config, "additional_config", None) or {}
    cfg = scorer_config(extra)
    if cfg is None or cfg.lossless:
        return
    where = f"additional_config.{SCORER_KEY}"
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        raise PluginConfigError(
            f"{where}.name: the {cfg.name!r} scorer changes how draft tokens are verified, but "
            "speculative decoding is off: add a speculative_config (e.g. this package's "
            "suffix_tree, or vLLM's ngram / draft_model)")
    model_config = getattr(vllm_config, "model_config", None)
    if cfg.name == "reflective":
        if not selects_plugin(spec):
            raise PluginConfigError(
                f"{where}.name: 'reflective' extends each draft with its probe, which only this "
                "package's proposers do (speculative_config.model = "
                "vllm_spec_plugins.integration.PluginDrafter); use 'judge' with vLLM's "
                f"{getattr(spec, 'method', '?')!r}")
        from .scoring import probe_token_ids
        from vllm_spec_plugins.scorers.reflective import max_real_draft

        m = len(probe_token_ids(cfg.probe, model_config))
        k = int(spec.num_speculative_tokens)
        if max_real_draft(k, m) < 1:
            raise PluginConfigError(
                f"{where}.probe: the probe is {m} tokens, so num_speculative_tokens={k} leaves "
                f"no room for a draft (a draft of n tokens is verified as 2n + {m}): raise "
                f"speculative_config.num_speculative_tokens to at least {m + 2}, or shorten "
                "the probe")
    logger.warning("vllm-spec-plugins: LOSSY scorer %r selected (requests: %s): outputs of the "
                   "requests it applies to will NOT be identical to the target model's own. A "
                   "request opts %s with extra_args / vllm_xargs {\"spec_lossy\": %s}.",
                   cfg.name, cfg.requests, "out" if cfg.requests == "opt_out" else "in",
                   "false" if cfg.requests == "opt_out" else "true")
    if cfg.name == "judge":
        from vllm_spec_plugins.scorers.judge import (
            JudgeFormatError, made_for, read_head_spec, resolve_head_path)
        from .scoring import _model_name

        if cfg.head is None and model_config is None:
            raise PluginConfigError(f"{where}.head: name the judge head (train-judge's output)")
        name = cfg.head or _model_name(model_config)
        try:
            head = read_head_spec(resolve_head_path(name))
        except JudgeFormatError as e:
            raise PluginConfigError(f"{where}.head: {e}") from None
        from .state_files import target_identity

        made = made_for(head)
        target = target_identity(model_config)
        if target is not None:
            target["name"] = _model_name(model_config)
            diff = [f"{k}: head {made[k]!r}, target {v!r}" for k, v in target.items()
                    if v and made.get(k) != v]
            if diff:
                raise PluginConfigError(
                    f"{where}.head: the judge head {name!r} was trained for {made['name']!r}, "
                    f"but the target {getattr(model_config, 'model', '?')!r} differs "
                    f"({'; '.join(diff)}); train one for this target: vllm-spec-plugins "
                    "train-judge --target MODEL")
