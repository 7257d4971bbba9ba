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
    from .patches import REGISTRATION_PATCHES, apply_patches
    from .server_metrics import install_collector

    install_collector()  # the drafter's counters on the API server's /metrics

    try:
        apply_patches(REGISTRATION_PATCHES)
    except Exception as e:  # noqa: BLE001 - never break vLLM processes from here
        logger.warning("vllm-spec-plugins: startup checks not installed (%s); settings are "
                       "then checked when the drafter is built", e)


def validate_engine_config(vllm_config: Any) -> None:
    """Fail at startup, in the user's process, with the field named.

    Without this a bad setting only surfaces inside the worker, and the user
    sees vLLM's generic "Engine core initialization failed"."""
    spec = getattr(vllm_config, "speculative_config", None)
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
