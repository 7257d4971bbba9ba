"""Which speculative methods the benchmark compares, and their engine settings.

A method is one of

* ``none`` -- no speculation (the baseline every speedup is measured against);
* ``ngram`` / ``suffix`` -- vLLM's built-in prompt lookup and SuffixDecoding
  (``suffix`` needs the ``arctic_inference`` package);
* ``draft_model`` -- vLLM's draft-model speculation, when ``--draft-model`` names
  a drafter;
* a method of this package's registry (``suffix_tree``, ...), with the settings of
  its ready-to-paste ``configs/<method>.json`` when that file exists;
* ``plugin:package.module:Class`` -- a user's own proposer class;
* ``path/to/config.json`` -- a ready-to-paste config file of this package
  (``speculative_config`` + ``additional_config``), labelled by its file stem;
* any of these followed by ``@judge``, ``@reflective`` or ``@scorer.json``:
  the same method verified by a LOSSY scorer (``configs/scorer_<name>.json``
  settings), labelled as written (``draft_model@judge``).

``all`` expands to every method that applies. ``num_speculative_tokens`` is the
same ``--k`` for every method, so the comparison is like for like.

Plain Python: nothing here imports vLLM.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

BASELINE = "none"
PLUGIN_PREFIX = "plugin:"
NGRAM_PROMPT_LOOKUP_MIN = 2
NGRAM_PROMPT_LOOKUP_MAX = 5
MAX_MODEL_LEN = 4096
VLLM_BUILTINS = ("none", "ngram", "suffix", "draft_model")
# Where the repository keeps one ready-to-paste config per method.
DEFAULT_CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass(frozen=True)
class MethodSpec:
    """One benchmarked method. ``label`` names it in tables and plots."""

    label: str
    kind: str                            # "none" | "ngram" | "suffix" | "draft_model" | "plugin"
    plugin_method: Optional[str] = None  # registry name or "pkg.module:Class" (kind plugin)
    settings: dict = field(default_factory=dict, hash=False, compare=False)
    lossless: bool = True
    source: str = ""                     # where the settings came from (a config file)
    # Intel OpenMP + tcmalloc in the engine's LD_PRELOAD (bench --cpu-preload):
    # True / False, or None = as the VSP_CPU_PRELOAD switch says.
    cpu_preload: Optional[bool] = None
    # additional_config.spec_plugins_scorer of a METHOD@SCORER entry ({} = standard).
    scorer: dict = field(default_factory=dict, hash=False, compare=False)


def registry_methods() -> dict[str, bool]:
    """Registry method name -> lossless."""
    from vllm_spec_plugins.registry import METHODS

    return {name: entry.lossless for name, entry in sorted(METHODS.items())}


def target_specific_methods() -> set[str]:
    """Registry methods whose settings name a model made for one target."""
    from vllm_spec_plugins.registry import METHODS

    return {name for name, entry in METHODS.items() if entry.target_specific}


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The plugin settings of a ready-to-paste config file (its
    ``additional_config.spec_plugins`` object, ``method`` included)."""
    from vllm_spec_plugins.registry import CONFIG_KEY

    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"--methods: no such config file {str(p)!r}") from None
    except OSError as e:
        raise ValueError(f"--methods: cannot read config file {str(p)!r}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: invalid JSON ({getattr(e, 'msg', e)})") from None
    extra = obj.get("additional_config") if isinstance(obj, dict) else None
    plugin = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if not isinstance(plugin, dict) or "method" not in plugin:
        raise ValueError(f"{p}: not a config of this package: expected "
                         f"{{\"additional_config\": {{\"{CONFIG_KEY}\": {{\"method\": ...}}}}}} "
                         "(see configs/ for one per method)")
    return dict(plugin)


def _registry_spec(name: str, lossless: bool, configs_dir: Optional[Path]) -> MethodSpec:
    path = configs_dir / f"{name}.json" if configs_dir else None
    if path is not None and path.is_file():
        settings = read_config_file(path)
        settings.pop("method", None)
        return MethodSpec(name, "plugin", name, settings, lossless, str(path))
    return MethodSpec(name, "plugin", name, {}, lossless, "defaults")


def read_scorer_file(path: str | os.PathLike) -> dict[str, Any]:
    """The scorer settings of a ready-to-paste scorer config file (its
    ``additional_config.spec_plugins_scorer`` object)."""
    from vllm_spec_plugins.engine_config import SCORER_KEY

    p = Path(path)
    try:
        obj = json.loads(p.read_text())
    except FileNotFoundError:
        raise ValueError(f"--methods: no such scorer config file {str(p)!r}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read it as JSON ({e})") from None
    extra = obj.get("additional_config") if isinstance(obj, dict) else None
    sc = extra.get(SCORER_KEY) if isinstance(extra, dict) else None
    if not isinstance(sc, dict):
        raise ValueError(f"{p}: not a scorer config: expected {{\"additional_config\": "
                         f"{{\"{SCORER_KEY}\": {{\"name\": ...}}}}}} (see configs/scorer_*.json)")
    return dict(sc)


def scorer_settings(text: str, configs_dir: Optional[Path] = DEFAULT_CONFIGS_DIR) -> dict:
    """``judge`` / ``reflective`` (with configs/scorer_<name>.json's settings
    when present) or a scorer config file -> validated scorer settings."""
    from vllm_spec_plugins.engine_config import SCORER_KEY, scorer_config

    if text.endswith(".json"):
        sc = read_scorer_file(text)
    elif text in ("judge", "reflective", "standard"):
        path = configs_dir / f"scorer_{text}.json" if configs_dir else None
        sc = read_scorer_file(path) if path is not None and path.is_file() else {"name": text}
    else:
        raise ValueError(f"--methods: unknown scorer {text!r} after '@': expected judge, "
                         "reflective, standard or a scorer config .json")
    scorer_config({SCORER_KEY: sc})  # PluginConfigError naming the field
    return sc


def _with_scorer(item: str, configs_dir: Optional[Path]) -> tuple[str, dict]:
    if "@" not in item:
        return item, {}
    base, _, sc = item.rpartition("@")
    return base, scorer_settings(sc.strip(), configs_dir)


def parse_methods(text: str, *, registry: Optional[dict[str, bool]] = None,
                  configs_dir: Optional[Path] = DEFAULT_CONFIGS_DIR,
                  draft_model: Optional[str] = None,
                  has_arctic: Optional[bool] = None) -> tuple[list[MethodSpec], list[str]]:
    """``--methods`` -> (specs, notes about methods left out of ``all``).

    Raises ValueError naming the bad entry and what is accepted instead."""
    registry = registry_methods() if registry is None else registry
    has_arctic = has_arctic_inference() if has_arctic is None else has_arctic
    items = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not items:
        raise ValueError("--methods: empty list")
    known = ", ".join(list(VLLM_BUILTINS) + sorted(registry))
    specs: list[MethodSpec] = []
    notes: list[str] = []
    for entry in items:
        item, scorer = _with_scorer(entry, configs_dir)
        if scorer:
            if item in ("all", "none"):
                raise ValueError(f"--methods: {entry!r}: a scorer needs a speculative method "
                                 "before '@' (e.g. draft_model@judge)")
            n_before = len(specs)
        if item == "all":
            for name in ("none", "ngram"):
                specs.append(MethodSpec(name, name))
            if has_arctic:
                specs.append(MethodSpec("suffix", "suffix"))
            else:
                notes.append("note: 'all' leaves out vLLM's 'suffix' (needs the arctic_inference "
                             "package: scripts/install_arctic_inference.sh)")
            if draft_model:
                specs.append(MethodSpec("draft_model", "draft_model"))
            else:
                notes.append("note: 'all' leaves out 'draft_model' (pass --draft-model to add it)")
            target_specific = target_specific_methods()
            for name, lossless in registry.items():
                if name in target_specific:
                    # Its settings name a model made for one target: name its config.
                    notes.append(f"note: 'all' leaves out {name!r} (its settings name a model "
                                 "made for one target: list its config file, e.g. "
                                 f"configs/{name}.json for the default model)")
                    continue
                specs.append(_registry_spec(name, lossless, configs_dir))
        elif item in ("none", "ngram"):
            specs.append(MethodSpec(item, item))
        elif item == "suffix":
            if not has_arctic:
                raise ValueError("--methods: 'suffix' (vLLM's SuffixDecoding) needs the "
                                 "arctic_inference package, which is not installed: run "
                                 "scripts/install_arctic_inference.sh or drop 'suffix'")
            specs.append(MethodSpec(item, item))
        elif item == "draft_model":
            if not draft_model:
                raise ValueError("--methods: 'draft_model' needs --draft-model "
                                 "(a model name or local directory of the drafter)")
            specs.append(MethodSpec(item, item))
        elif item in registry:
            specs.append(_registry_spec(item, registry[item], configs_dir))
        elif item.startswith(PLUGIN_PREFIX):
            name = item[len(PLUGIN_PREFIX):]
            if name in registry:
                specs.append(_registry_spec(name, registry[name], configs_dir))
            elif ":" in name:
                specs.append(MethodSpec(item, "plugin", name, {}, True, "custom class"))
            else:
                raise ValueError(f"--methods: unknown plugin method {name!r} in {item!r}; "
                                 f"this package's methods: {', '.join(sorted(registry))} "
                                 "(or plugin:package.module:ClassName)")
        elif item.endswith(".json"):
            settings = read_config_file(item)
            name = settings.pop("method")
            lossless = registry.get(name, True)
            specs.append(MethodSpec(Path(item).stem, "plugin", name, settings, lossless, item))
        else:
            raise ValueError(f"--methods: unknown method {item!r}; expected all, one of {known}, "
                             "plugin:package.module:Class or a config .json file")
        if scorer:
            from dataclasses import replace

            m = specs[n_before]
            specs[n_before] = replace(m, label=entry, scorer=scorer,
                                      lossless=m.lossless and scorer.get("name") == "standard")
    labels = [s.label for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"--methods: listed more than once: {', '.join(dup)}")
    return specs, notes


def has_arctic_inference() -> bool:
    try:
        return importlib.util.find_spec("arctic_inference") is not None
    except (ImportError, ValueError):
        return False


def engine_kwargs(method: MethodSpec, *, model: str, dtype: str, seed: int, k: int,
                  kv_cache_bytes: int, plugin_config: Optional[dict] = None,
                  draft_model_path: Optional[str] = None,
                  enforce_eager: bool = False) -> dict[str, Any]:
    """The ``LLM(...)`` keyword arguments of one method's engine (the online mode
    turns the same dict into server flags). ``plugin_config`` overrides the
    method's own settings."""
    kw: dict[str, Any] = dict(model=model, dtype=dtype, kv_cache_memory_bytes=int(kv_cache_bytes),
                              max_model_len=MAX_MODEL_LEN, disable_log_stats=False, seed=seed)
    if enforce_eager:
        kw["enforce_eager"] = True
    if method.kind == "none":
        pass
    elif method.kind == "ngram":
        kw["speculative_config"] = {"method": "ngram", "num_speculative_tokens": k,
                                    "prompt_lookup_min": NGRAM_PROMPT_LOOKUP_MIN,
                                    "prompt_lookup_max": NGRAM_PROMPT_LOOKUP_MAX}
    elif method.kind == "suffix":
        kw["speculative_config"] = {"method": "suffix", "num_speculative_tokens": k}
    elif method.kind == "draft_model":
        if not draft_model_path:
            raise ValueError("method draft_model needs a drafter model path")
        kw["speculative_config"] = {"method": "draft_model", "model": draft_model_path,
                                    "num_speculative_tokens": k}
    elif method.kind == "plugin":
        from vllm_spec_plugins.engine_config import CONFIG_KEY, speculative_config

        kw["speculative_config"] = speculative_config(k)
        kw["additional_config"] = {CONFIG_KEY: {"method": method.plugin_method,
                                                **method.settings, **(plugin_config or {})}}
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    if method.scorer:
        from vllm_spec_plugins.engine_config import SCORER_KEY

        if method.kind == "none":
            raise ValueError("a scorer needs speculative decoding (method none has none)")
        kw.setdefault("additional_config", {})[SCORER_KEY] = dict(method.scorer)
    return kw


def validate_plugin_settings(methods: Sequence[MethodSpec], plugin_config: dict) -> None:
    """Check every plugin method's settings before any engine starts (the
    registry's message names the field)."""
    from vllm_spec_plugins.registry import resolve

    for m in methods:
        if m.kind == "plugin":
            try:
                resolve({"method": m.plugin_method, **m.settings, **plugin_config})
            except ValueError as e:  # same type (PluginConfigError), with where it came from
                where = " + ".join(x for x in (m.source, "--plugin-config" if plugin_config else "") if x)
                raise type(e)(f"method {m.label!r}" + (f" (settings: {where})" if where else "")
                              + f": {e}") from None


def labels(methods: Iterable[MethodSpec]) -> list[str]:
    return [m.label for m in methods]
