"""bench/methods.py: --methods parsing, per-method engine settings, plugin validation.

Pure: no engine, no model. ``parse_methods`` gets its registry, configs dir,
arctic availability and drafter explicitly, so results do not depend on what
this machine has installed."""

from __future__ import annotations

import json

import pytest

from vllm_spec_plugins.bench import methods as M
from vllm_spec_plugins.bench.methods import MethodSpec, engine_kwargs, parse_methods
from vllm_spec_plugins.registry import PluginConfigError

REGISTRY = {"suffix_tree": True}
REGISTRY_WITH_LOSSY = {"suffix_tree": True, "fancy": False}


def parse(text, *, registry=REGISTRY, configs_dir=None, has_arctic=False, draft_model=None):
    return parse_methods(text, registry=registry, configs_dir=configs_dir,
                         has_arctic=has_arctic, draft_model=draft_model)


def write_config(path, settings, speculative=True):
    obj = {"additional_config": {"spec_plugins": settings}}
    if speculative:
        obj["speculative_config"] = {"method": "custom_class",
                                     "model": "vllm_spec_plugins.integration.PluginDrafter",
                                     "num_speculative_tokens": 16}
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------- all


def test_all_without_arctic_or_drafter_leaves_them_out_with_notes(tmp_path):
    specs, notes = parse("all", configs_dir=tmp_path)
    assert [(s.label, s.kind) for s in specs] == [
        ("none", "none"), ("ngram", "ngram"), ("suffix_tree", "plugin")]
    assert len(notes) == 2
    assert "'suffix'" in notes[0] and "arctic_inference" in notes[0]
    assert "'draft_model'" in notes[1] and "--draft-model" in notes[1]
    assert all("\n" not in n for n in notes)


def test_all_with_arctic_and_drafter_has_every_method_and_no_notes(tmp_path):
    specs, notes = parse("all", configs_dir=tmp_path, has_arctic=True, draft_model="qwen-0.5b")
    assert [(s.label, s.kind) for s in specs] == [
        ("none", "none"), ("ngram", "ngram"), ("suffix", "suffix"),
        ("draft_model", "draft_model"), ("suffix_tree", "plugin")]
    assert notes == []


def test_all_takes_lossless_flags_from_the_registry(tmp_path):
    specs, _ = parse("all", registry=REGISTRY_WITH_LOSSY, configs_dir=tmp_path)
    by = {s.label: s for s in specs}
    assert by["fancy"].lossless is False and by["fancy"].plugin_method == "fancy"
    assert by["suffix_tree"].lossless is True
    assert by["none"].lossless is True and by["ngram"].lossless is True


def test_all_plus_an_explicit_member_is_a_duplicate(tmp_path):
    with pytest.raises(ValueError, match="--methods: listed more than once: none"):
        parse("all,none", configs_dir=tmp_path)


# --------------------------------------------------------------------------- registry methods


def test_registry_method_picks_up_configs_dir_settings(tmp_path):
    cfg = write_config(tmp_path / "suffix_tree.json",
                       {"method": "suffix_tree", "max_tree_depth": 24, "min_token_prob": 0.3})
    (spec,), notes = parse("suffix_tree", configs_dir=tmp_path)
    assert notes == []
    assert (spec.label, spec.kind, spec.plugin_method) == ("suffix_tree", "plugin", "suffix_tree")
    assert spec.settings == {"max_tree_depth": 24, "min_token_prob": 0.3}  # "method" dropped
    assert spec.source == str(cfg)


def test_registry_method_without_config_file_uses_defaults(tmp_path):
    (spec,), _ = parse("suffix_tree", configs_dir=tmp_path)  # empty dir
    assert spec.settings == {} and spec.source == "defaults"
    (spec,), _ = parse("suffix_tree", configs_dir=None)
    assert spec.settings == {} and spec.source == "defaults"


def test_registry_method_with_a_bad_config_file_in_configs_dir_names_it(tmp_path):
    bad = tmp_path / "suffix_tree.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON") as e:
        parse("suffix_tree", configs_dir=tmp_path)
    assert str(bad) in str(e.value)


def test_repository_config_is_the_default_configs_dir():
    """The shipped configs/suffix_tree.json is what a plain ``suffix_tree`` runs."""
    shipped = json.loads((M.DEFAULT_CONFIGS_DIR / "suffix_tree.json").read_text())
    expected = dict(shipped["additional_config"]["spec_plugins"])
    expected.pop("method")
    (spec,), _ = parse_methods("suffix_tree", registry=REGISTRY, has_arctic=False)
    assert spec.settings == expected
    assert spec.source == str(M.DEFAULT_CONFIGS_DIR / "suffix_tree.json")


def test_plugin_prefix_of_a_registry_method_is_that_method(tmp_path):
    write_config(tmp_path / "suffix_tree.json", {"method": "suffix_tree", "max_tree_depth": 12})
    (spec,), _ = parse("plugin:suffix_tree", configs_dir=tmp_path)
    assert (spec.label, spec.plugin_method) == ("suffix_tree", "suffix_tree")
    assert spec.settings == {"max_tree_depth": 12}
    with pytest.raises(ValueError, match="listed more than once: suffix_tree"):
        parse("suffix_tree,plugin:suffix_tree", configs_dir=tmp_path)


def test_plugin_custom_class():
    (spec,), _ = parse("plugin:pkg.mod:Cls")
    assert (spec.label, spec.kind, spec.plugin_method) == ("plugin:pkg.mod:Cls", "plugin", "pkg.mod:Cls")
    assert spec.settings == {} and spec.lossless is True and spec.source == "custom class"


def test_builtins_and_order_kept(tmp_path):
    specs, notes = parse(" ngram , none,suffix,draft_model ", configs_dir=tmp_path,
                         has_arctic=True, draft_model="/d")
    assert [(s.label, s.kind) for s in specs] == [
        ("ngram", "ngram"), ("none", "none"), ("suffix", "suffix"), ("draft_model", "draft_model")]
    assert notes == []


# --------------------------------------------------------------------------- config files as methods


def test_config_json_path_is_a_method_labelled_by_its_stem(tmp_path):
    cfg = write_config(tmp_path / "deep_tree.json", {"method": "suffix_tree", "max_tree_depth": 128})
    specs, _ = parse(f"none,{cfg}")
    spec = specs[1]
    assert (spec.label, spec.kind, spec.plugin_method) == ("deep_tree", "plugin", "suffix_tree")
    assert spec.settings == {"max_tree_depth": 128}
    assert spec.source == str(cfg) and spec.lossless is True


def test_config_json_of_a_lossy_method_is_lossy(tmp_path):
    cfg = write_config(tmp_path / "f.json", {"method": "fancy"})
    (spec,), _ = parse(str(cfg), registry=REGISTRY_WITH_LOSSY)
    assert spec.plugin_method == "fancy" and spec.lossless is False


def test_config_json_with_only_additional_config_is_accepted(tmp_path):
    cfg = write_config(tmp_path / "short.json", {"method": "suffix_tree"}, speculative=False)
    (spec,), _ = parse(str(cfg))
    assert spec.label == "short" and spec.settings == {}


def test_config_json_invalid_json_names_the_file(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('{"additional_config": ')
    with pytest.raises(ValueError) as e:
        parse(f"none,{bad}")
    msg = str(e.value)
    assert str(bad) in msg and "invalid JSON" in msg and "\n" not in msg


@pytest.mark.parametrize("content", [
    {"speculative_config": {"method": "ngram", "num_speculative_tokens": 4}},
    {"additional_config": {"spec_plugins": {"max_tree_depth": 4}}},  # no method
    {"additional_config": {"other_plugin": {"method": "x"}}},
    [1, 2, 3],
])
def test_config_json_not_of_this_package_names_the_file(tmp_path, content):
    path = tmp_path / "vllm_only.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError) as e:
        parse(str(path))
    msg = str(e.value)
    assert str(path) in msg and "not a config of this package" in msg and "\n" not in msg


@pytest.mark.parametrize("kind", ["additional_config list", "additional_config string", "directory"])
def test_config_json_odd_shapes_give_a_value_error_naming_the_file(tmp_path, kind):
    path = tmp_path / "odd.json"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text(json.dumps({"additional_config": ["spec_plugins"] if "list" in kind else "x"}))
    with pytest.raises(ValueError) as e:
        parse(str(path))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_config_json_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(ValueError, match="--methods: no such config file") as e:
        parse(str(missing))
    assert str(missing) in str(e.value)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("text, kwargs, fragments", [
    ("none,eagle", {}, ["unknown method 'eagle'", "none, ngram, suffix, draft_model, suffix_tree"]),
    ("plugin:nope", {}, ["unknown plugin method 'nope'", "suffix_tree"]),
    ("none,suffix", {"has_arctic": False}, ["'suffix'", "arctic_inference"]),
    ("draft_model", {"draft_model": None}, ["'draft_model' needs --draft-model"]),
    ("none,ngram,none", {}, ["listed more than once: none"]),
    ("ngram,ngram,suffix_tree,suffix_tree", {}, ["listed more than once: ngram, suffix_tree"]),
    ("", {}, ["empty list"]),
    (" , ,", {}, ["empty list"]),
])
def test_errors_are_one_line_and_name_the_flag(tmp_path, text, kwargs, fragments):
    with pytest.raises(ValueError) as e:
        parse(text, configs_dir=tmp_path, **kwargs)
    msg = str(e.value)
    assert msg.startswith("--methods: ")
    assert "\n" not in msg
    for f in fragments:
        assert f in msg


def test_suffix_is_accepted_with_arctic():
    (spec,), _ = parse("suffix", has_arctic=True)
    assert spec.kind == "suffix"


# --------------------------------------------------------------------------- engine_kwargs

COMMON = dict(model="/models/m", dtype="float32", seed=7, k=5, kv_cache_bytes=1.5 * (1 << 30))


def test_engine_kwargs_none():
    kw = engine_kwargs(MethodSpec("none", "none"), **COMMON)
    assert kw == {"model": "/models/m", "dtype": "float32", "kv_cache_memory_bytes": 3 << 29,
                  "max_model_len": M.MAX_MODEL_LEN, "disable_log_stats": False, "seed": 7}
    assert isinstance(kw["kv_cache_memory_bytes"], int)
    assert "speculative_config" not in kw and "enforce_eager" not in kw


def test_engine_kwargs_enforce_eager():
    assert engine_kwargs(MethodSpec("none", "none"), enforce_eager=True, **COMMON)["enforce_eager"] is True


def test_engine_kwargs_ngram_lookup_bounds():
    sc = engine_kwargs(MethodSpec("ngram", "ngram"), **COMMON)["speculative_config"]
    assert sc == {"method": "ngram", "num_speculative_tokens": 5,
                  "prompt_lookup_min": M.NGRAM_PROMPT_LOOKUP_MIN,
                  "prompt_lookup_max": M.NGRAM_PROMPT_LOOKUP_MAX}
    assert 1 <= sc["prompt_lookup_min"] <= sc["prompt_lookup_max"]


def test_engine_kwargs_suffix():
    sc = engine_kwargs(MethodSpec("suffix", "suffix"), **COMMON)["speculative_config"]
    assert sc == {"method": "suffix", "num_speculative_tokens": 5}


def test_engine_kwargs_draft_model():
    kw = engine_kwargs(MethodSpec("draft_model", "draft_model"), draft_model_path="/models/d", **COMMON)
    assert kw["speculative_config"] == {"method": "draft_model", "model": "/models/d",
                                        "num_speculative_tokens": 5}
    assert kw["model"] == "/models/m"
    with pytest.raises(ValueError, match="drafter"):
        engine_kwargs(MethodSpec("draft_model", "draft_model"), **COMMON)


def test_engine_kwargs_plugin_settings_with_plugin_config_overriding():
    settings = {"max_tree_depth": 32, "min_token_prob": 0.2}
    spec = MethodSpec("suffix_tree", "plugin", "suffix_tree", settings)
    kw = engine_kwargs(spec, plugin_config={"max_tree_depth": 8, "use_global_cache": False}, **COMMON)
    assert kw["speculative_config"] == {"method": "custom_class",
                                        "model": "vllm_spec_plugins.integration.PluginDrafter",
                                        "num_speculative_tokens": 5}
    assert kw["additional_config"] == {"spec_plugins": {
        "method": "suffix_tree", "max_tree_depth": 8, "min_token_prob": 0.2, "use_global_cache": False}}
    assert spec.settings == {"max_tree_depth": 32, "min_token_prob": 0.2}  # not mutated
    # without plugin_config: the method's own settings
    kw = engine_kwargs(spec, **COMMON)
    assert kw["additional_config"]["spec_plugins"] == {"method": "suffix_tree", **settings}


def test_engine_kwargs_custom_plugin_class():
    kw = engine_kwargs(MethodSpec("plugin:a.b:C", "plugin", "a.b:C"), **COMMON)
    assert kw["additional_config"] == {"spec_plugins": {"method": "a.b:C"}}


def test_engine_kwargs_unknown_kind():
    with pytest.raises(ValueError, match="unknown method kind 'eagle'"):
        engine_kwargs(MethodSpec("x", "eagle"), **COMMON)


# --------------------------------------------------------------------------- validate_plugin_settings


def test_validate_plugin_settings_accepts_good_settings_and_ignores_builtins():
    specs = [MethodSpec("none", "none", settings={"max_tree_depth": -1}),
             MethodSpec("suffix_tree", "plugin", "suffix_tree", {"max_tree_depth": 16})]
    assert M.validate_plugin_settings(specs, {"min_token_prob": 0.5}) is None


@pytest.mark.parametrize("settings, plugin_config, field", [
    ({"max_tree_depth": -1}, {}, "max_tree_depth"),      # SuffixTreeConfig: ge=2
    ({"max_tree_depth": 1}, {}, "max_tree_depth"),
    ({}, {"min_token_prob": 1.5}, "min_token_prob"),     # le=1
    ({}, {"no_such_setting": 1}, "no_such_setting"),     # extra="forbid"
])
def test_validate_plugin_settings_raises_the_registry_error(settings, plugin_config, field):
    spec = MethodSpec("suffix_tree", "plugin", "suffix_tree", settings)
    with pytest.raises(PluginConfigError) as e:
        M.validate_plugin_settings([MethodSpec("none", "none"), spec], plugin_config)
    assert f"spec_plugins.{field}" in str(e.value)
    assert "suffix_tree" in str(e.value)


def test_validate_plugin_settings_plugin_config_overrides_a_bad_file_setting():
    spec = MethodSpec("t", "plugin", "suffix_tree", {"max_tree_depth": -1})
    M.validate_plugin_settings([spec], {"max_tree_depth": 32})  # no error: override wins
    with pytest.raises(PluginConfigError):
        M.validate_plugin_settings([spec], {})


def test_validate_plugin_settings_unknown_plugin_method():
    with pytest.raises(PluginConfigError, match="unknown method 'nope'"):
        M.validate_plugin_settings([MethodSpec("nope", "plugin", "nope")], {})


def test_all_leaves_out_a_target_specific_method_and_says_so():
    """A method whose settings name a model made for one target (the
    registry's ``target_specific``: cascade) is not run by "all"; the note
    names it and where its config is."""
    specs, notes = parse("all", registry={"suffix_tree": True, "cascade": True})
    assert "cascade" not in [s.label for s in specs] and "suffix_tree" in [s.label for s in specs]
    assert any("'cascade'" in n and "configs/cascade.json" in n for n in notes)
