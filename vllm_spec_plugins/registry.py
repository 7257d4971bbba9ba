"""The one registry: method name -> (proposer class, pydantic config class).

Also resolves the plugin's own settings (``additional_config["spec_plugins"]``)
into a validated config. No vLLM imports: the integration layer calls this.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ValidationError

from vllm_spec_plugins.config import (
    CascadeConfig,
    DiffusionConfig,
    SuffixRecyclingConfig,
    SuffixTreeConfig,
    TokenRecyclingConfig,
)

from vllm_spec_plugins.engine_config import (  # noqa: F401 (CONFIG_KEY, PluginConfigError re-exported)
    BUDGET_FIELD,
    CONFIG_KEY,
    PluginConfigError,
    draft_budget_config,
)


@dataclass(frozen=True)
class MethodEntry:
    # "module:Class", imported only when a proposer is built: the proposers pull
    # in numba, which must not load before vLLM's CPU worker initialises.
    proposer_path: str
    config_cls: type[BaseModel]
    lossless: bool
    summary: str
    # Its settings name a model made for one target (a draft model sharing the
    # target's tokenizer): no defaults fit every target, so it is run from a
    # config file in configs/ (and left out of the bench's "all").
    target_specific: bool = False

    def proposer_cls(self) -> type:
        mod, _, name = self.proposer_path.partition(":")
        return getattr(importlib.import_module(mod), name)


METHODS: dict[str, MethodEntry] = {
    "suffix_tree": MethodEntry(
        "vllm_spec_plugins.proposers.suffix_tree:SuffixTreeProposer", SuffixTreeConfig,
        lossless=True,
        summary="SuffixDecoding: per-request + global suffix trees (model-free)"),
    "token_recycling": MethodEntry(
        "vllm_spec_plugins.proposers.token_recycling:TokenRecyclingProposer",
        TokenRecyclingConfig, lossless=True,
        summary="Token Recycling: drafts from the target's own past top-k (shared matrix)"),
    "suffix_recycling": MethodEntry(
        "vllm_spec_plugins.proposers.suffix_recycling:SuffixRecyclingProposer",
        SuffixRecyclingConfig, lossless=True,
        summary="suffix tree on a long context match, Token Recycling otherwise"),
    "cascade": MethodEntry(
        "vllm_spec_plugins.proposers.cascade:CascadeProposer", CascadeConfig, lossless=True,
        summary="cascade: a draft model checking cheaper drafters' proposals in one pass",
        target_specific=True),
    "diffusion": MethodEntry(
        "vllm_spec_plugins.proposers.diffusion:DiffusionProposer", DiffusionConfig,
        lossless=True,
        summary="diffusion drafter: a masked-block drafter trained for the target "
                "(train-drafter), one pass per block, path search",
        target_specific=True),
}


def _format_validation_error(method: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        field = f"additional_config.{CONFIG_KEY}.{loc}"
        if e["type"] == "extra_forbidden":
            lines.append(f"{field}: unknown setting for method {method!r}")
        else:
            lines.append(f"{field}: {e['msg']} (got {e.get('input')!r})")
    return "\n  ".join(lines)


def _import_custom(path: str) -> MethodEntry:
    """``"pkg.module:ClassName"``: a user's own Proposer subclass.

    The class may define ``Config`` (a pydantic model) for its settings."""
    mod_name, _, cls_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(mod_name), cls_name)
    except (ImportError, AttributeError) as e:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.method: cannot import {path!r} ({e})") from e
    from vllm_spec_plugins.proposers.base import Proposer

    if not (isinstance(cls, type) and issubclass(cls, Proposer)):
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.method: {path!r} is not a "
            "vllm_spec_plugins.proposers.base.Proposer subclass")
    config_cls = getattr(cls, "Config", None) or BaseModel
    return MethodEntry(path, config_cls, lossless=True, summary=f"custom proposer {path}")


def resolve(settings: dict[str, Any] | None) -> tuple[str, MethodEntry, BaseModel]:
    """Validate the plugin settings; return (method, entry, config)."""
    known = ", ".join(sorted(METHODS))
    if isinstance(settings, BaseModel):
        settings = settings.model_dump()
    if not settings or not isinstance(settings, dict) or "method" not in settings:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.method is required: pass e.g. "
            f'additional_config={{"{CONFIG_KEY}": {{"method": "suffix_tree"}}}} '
            f"(known methods: {known}; or 'package.module:ClassName')")
    if not isinstance(settings, dict):
        raise PluginConfigError(f"additional_config.{CONFIG_KEY} must be a JSON object")
    params = dict(settings)
    method = params.pop("method")
    draft_budget_config(params)  # every method's; validated here, used by the drafter
    params.pop(BUDGET_FIELD, None)
    if not isinstance(method, str):
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.method must be a string, got {method!r}")
    if method in METHODS:
        entry = METHODS[method]
    elif ":" in method:
        entry = _import_custom(method)
    else:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.method: unknown method {method!r}; "
            f"known methods: {known} (or 'package.module:ClassName')")
    try:
        config = entry.config_cls(**params)
    except ValidationError as e:
        raise PluginConfigError(
            f"invalid settings for method {method!r}:\n  {_format_validation_error(method, e)}"
        ) from None
    return method, entry, config


def build_proposer(settings: dict[str, Any] | None, num_speculative_tokens: int) -> tuple[str, Any, BaseModel]:
    method, entry, config = resolve(settings)
    return method, entry.proposer_cls()(config, num_speculative_tokens), config


def available_methods() -> dict[str, Callable[..., Any] | str]:
    return {name: e.summary for name, e in METHODS.items()}
