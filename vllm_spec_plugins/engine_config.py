"""The engine options that select this plugin: one definition of each.

Plain Python (no vLLM): the integration layer, the bench, the deploy recipes
and the Ray Data script all build and read engine options through here.

* ``speculative_config``: vLLM's custom-class proposer, naming our drafter
  (:data:`DRAFTER_CLASS_PATH`); ``num_speculative_tokens`` is the per-step cap.
* ``additional_config[CONFIG_KEY]``: the method and its settings (vLLM has no
  other free-form field that reaches the workers);
  ``additional_config[SHARING_KEY]``: optional cross-replica sharing.
"""

from __future__ import annotations

from typing import Any, Optional

#: additional_config key of the plugin's settings ({"method": ..., ...}).
CONFIG_KEY = "spec_plugins"
#: additional_config key of cross-replica sharing (sharing.py).
SHARING_KEY = "spec_plugins_sharing"
#: additional_config key of the acceptance rule (scorers; default standard, lossless).
SCORER_KEY = "spec_plugins_scorer"
#: SamplingParams.extra_args / vllm_xargs key: a request's own choice of lossy scoring.
REQUEST_LOSSY_ARG = "spec_lossy"
#: The class vLLM's custom-class path instantiates in every worker.
DRAFTER_CLASS_PATH = "vllm_spec_plugins.integration.PluginDrafter"
#: Longest draft vLLM 0.32 can verify (MAX_SPEC_LEN in v1/sample/rejection_sampler.py):
#: a longer one trips an assertion in the rejection sampler and kills the engine.
VLLM_MAX_SPEC_LEN = 128


class PluginConfigError(ValueError):
    """Bad plugin settings. The message names the field and how to fix it."""


def speculative_config(num_speculative_tokens: int = 16) -> dict[str, Any]:
    """The ``speculative_config`` that selects this plugin."""
    return {"method": "custom_class", "model": DRAFTER_CLASS_PATH,
            "num_speculative_tokens": int(num_speculative_tokens)}


def selects_plugin(speculative: Any) -> bool:
    """Does this speculative config (a dict or vLLM's SpeculativeConfig) name our drafter?"""
    model = speculative.get("model") if isinstance(speculative, dict) else getattr(
        speculative, "model", None)
    return model == DRAFTER_CLASS_PATH


def check_num_speculative_tokens(k: Any) -> int:
    """``num_speculative_tokens`` within what vLLM can verify, else a clear error."""
    try:
        k = int(k)
    except (TypeError, ValueError):
        raise PluginConfigError(f"speculative_config.num_speculative_tokens must be an "
                                f"integer, got {k!r}") from None
    if k < 1:
        raise PluginConfigError("speculative_config.num_speculative_tokens must be >= 1 "
                                f"(got {k})")
    if k > VLLM_MAX_SPEC_LEN:
        raise PluginConfigError(
            f"speculative_config.num_speculative_tokens={k} is above {VLLM_MAX_SPEC_LEN}, the "
            f"longest draft vLLM can verify (MAX_SPEC_LEN): set it to at most "
            f"{VLLM_MAX_SPEC_LEN}. It is an upper bound; the proposers draft less when "
            "acceptance is unlikely.")
    return k


#: Field of the plugin settings (any method) holding the shared draft budget.
BUDGET_FIELD = "draft_budget"


def _settings_object(model_cls: Any, raw: Any, where: str, example: str) -> Any:
    """``model_cls(**raw)``, or a PluginConfigError naming ``where.<field>``."""
    from pydantic import ValidationError

    if not isinstance(raw, dict):
        raise PluginConfigError(f"{where} must be a JSON object (e.g. {example}; {{}} = defaults)")
    try:
        return model_cls(**raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err.get("loc", ())) or "?"
        raise PluginConfigError(f"{where}.{field}: {err.get('msg')}") from None


def draft_budget_config(settings: Optional[dict]) -> Any:
    """The validated ``additional_config.spec_plugins.draft_budget`` (defaults
    if absent)."""
    from vllm_spec_plugins.config import DraftBudgetConfig

    raw = (settings or {}).get(BUDGET_FIELD) if isinstance(settings, dict) else None
    if raw is None:
        return DraftBudgetConfig()
    return _settings_object(DraftBudgetConfig, raw, f"additional_config.{CONFIG_KEY}.{BUDGET_FIELD}",
                            '{"enabled": false}')


def sharing_config(additional_config: Optional[dict]) -> Any:
    """The validated ``additional_config.spec_plugins_sharing`` (None if absent)."""
    raw = (additional_config or {}).get(SHARING_KEY)
    if raw is None:
        return None
    from vllm_spec_plugins.config import SharingConfig

    return _settings_object(SharingConfig, raw, f"additional_config.{SHARING_KEY}",
                            '{"hub": "my-hub"}')


def scorer_config(additional_config: Optional[dict]) -> Any:
    """The validated ``additional_config.spec_plugins_scorer`` (None if absent)."""
    raw = (additional_config or {}).get(SCORER_KEY)
    if raw is None:
        return None
    from vllm_spec_plugins.config import ScorerConfig

    return _settings_object(ScorerConfig, raw, f"additional_config.{SCORER_KEY}",
                            '{"name": "judge", "head": "qwen2.5-coder-1.5b"}')


def request_lossy(extra_args: Optional[dict], requests_mode: str) -> bool:
    """Does a request get the lossy scorer? Its ``extra_args["spec_lossy"]``
    (true/false) decides where given; else the deployment's mode does
    (opt_out: yes, opt_in: no)."""
    v = (extra_args or {}).get(REQUEST_LOSSY_ARG) if isinstance(extra_args, dict) else None
    if isinstance(v, str):
        v = v.strip().lower() in ("1", "true", "yes", "on", "lossy")
    if v is None:
        return requests_mode == "opt_out"
    return bool(v)


def engine_kwargs(method: str, num_speculative_tokens: int = 8,
                  settings: Optional[dict[str, Any]] = None,
                  sharing: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The vLLM engine arguments that turn on ``method`` (validated: a bad
    setting raises PluginConfigError naming it), for ``LLM(**kwargs)``, Ray
    Serve's ``engine_kwargs`` or Ray Data's processor config."""
    from vllm_spec_plugins.registry import resolve

    check_num_speculative_tokens(num_speculative_tokens)
    plugin = {"method": method, **(settings or {})}
    resolve(plugin)
    extra: dict[str, Any] = {CONFIG_KEY: plugin}
    if sharing is not None:
        sharing_config({SHARING_KEY: sharing})
        extra[SHARING_KEY] = dict(sharing)
    return {"speculative_config": speculative_config(num_speculative_tokens),
            "additional_config": extra}
