"""Settings validation and the method registry (no engine)."""

import numpy as np
import pytest

from vllm_spec_plugins.registry import METHODS, PluginConfigError, resolve


def test_default_settings_resolve():
    method, entry, config = resolve({"method": "suffix_tree"})
    assert method == "suffix_tree" and entry.lossless
    assert config.max_tree_depth == 64


@pytest.mark.parametrize("settings, needle", [
    ({"method": "suffix_tree", "bogus": 1}, "spec_plugins.bogus: unknown setting"),
    ({"method": "suffix_tree", "min_token_prob": 2.0}, "spec_plugins.min_token_prob"),
    ({"method": "suffix_tree", "max_tree_depth": 1}, "spec_plugins.max_tree_depth"),
    ({"method": "nope"}, "known methods: cascade, diffusion, suffix_recycling, suffix_tree, token_recycling"),
    ({}, "spec_plugins.method is required"),
    ({"method": 3}, "must be a string"),
    ({"method": "os:path"}, "is not a vllm_spec_plugins.proposers.base.Proposer subclass"),
    ({"method": "no_such_module_xyz:Cls"}, "cannot import"),
])
def test_bad_settings_name_the_field(settings, needle):
    with pytest.raises(PluginConfigError) as err:
        resolve(settings)
    assert needle in str(err.value)


@pytest.fixture(autouse=True)
def _drafters(untrained_drafter_cache, monkeypatch):
    """configs/diffusion.json names the default model's drafter by name: the
    session's untrained one stands in for a trained one here."""
    monkeypatch.setenv("VSP_DRAFTER_CACHE", str(untrained_drafter_cache))


def method_config(name):
    """The method's defaults; for a method with required settings (cascade:
    its levels), the ready-to-paste file in configs/."""
    import json
    import pathlib

    if not METHODS[name].target_specific:
        return METHODS[name].config_cls()
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.json"
    return resolve(json.loads(path.read_text())["additional_config"]["spec_plugins"])[2]


def test_every_method_builds_with_defaults():
    for name, entry in METHODS.items():
        cls = entry.proposer_cls()
        proposer = cls(method_config(name), 8)
        state = proposer.start_request("r", np.array([1, 2, 3, 1, 2], np.int32))
        proposer.on_tokens(state, np.array([3], np.int32))
        draft = proposer.propose(state, np.array([1, 2, 3, 1, 2, 3], np.int32), 4)
        assert isinstance(draft, list) and len(draft) <= 4
        proposer.finish_request(state)
        assert proposer.save_state() is False  # no state file unless a setting names one


def test_configs_dir_matches_registry():
    import json
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "configs"
    for name in METHODS:
        cfg = json.loads((root / f"{name}.json").read_text())
        assert cfg["speculative_config"]["model"] == "vllm_spec_plugins.integration.PluginDrafter"
        _, _, settings = resolve(cfg["additional_config"]["spec_plugins"])
        # Ready to paste = every setting spelled out, at its documented default.
        written = dict(cfg["additional_config"]["spec_plugins"])
        written.pop("method")
        assert written == entry_defaults(name), f"configs/{name}.json drifted from defaults"
        assert settings == method_config(name)


def entry_defaults(name: str) -> dict:
    if METHODS[name].target_specific:  # required settings: every one spelled out
        return method_config(name).model_dump()
    return METHODS[name].config_cls().model_dump()


def test_cascade_config_for_the_qwen_pair_is_complete(tmp_path, monkeypatch):
    """configs/cascade_qwen2.5-coder.json: every setting spelled out at its
    default. The drafter need not be fetched for this check: a stand-in
    model directory takes its place."""
    import json
    import pathlib

    (tmp_path / "qwen2.5-coder-0.5b" / "hf").mkdir(parents=True)
    (tmp_path / "qwen2.5-coder-0.5b" / "hf" / "config.json").write_text("{}")
    monkeypatch.setenv("VSP_MODEL_CACHE", str(tmp_path))
    path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "cascade_qwen2.5-coder.json"
    written = json.loads(path.read_text())["additional_config"]["spec_plugins"]
    _, _, settings = resolve(written)
    assert settings.levels[0].model == "qwen2.5-coder-0.5b"
    assert {k: v for k, v in written.items() if k != "method"} == settings.model_dump()
