"""The patch mechanism (integration/patches.py) on a stand-in module, and the
declared patches against the installed vLLM."""

from __future__ import annotations

import functools
import sys
import types

import pytest

from vllm_spec_plugins.integration import patches as P


@pytest.fixture
def target(monkeypatch):
    mod = types.ModuleType("vllm._standin_target")  # looks like a vLLM module

    class Runner:
        def step(self, x):
            return ("step", x)

        def sample(self, x):
            return ("sample", x)

    Runner.__module__ = mod.__name__
    for f in (Runner.step, Runner.sample):
        f.__module__ = mod.__name__
    mod.Runner = Runner
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    return mod


def wrap(tag):
    def make(original):
        def replacement(self, x):
            return (tag, original(self, x))
        return replacement
    return make


def decl(name, attr, tag):
    return P.VllmPatch(name, "vllm._standin_target", "Runner", attr, wrap(tag))


def test_applied_once_and_recorded(target):
    ps = [decl("p-step", "step", "A"), decl("p-sample", "sample", "B")]
    assert P.apply_patches(ps) == ["p-step", "p-sample"]
    assert P.apply_patches(ps) == []  # idempotent (a re-import applies nothing twice)
    r = target.Runner()
    assert r.step(1) == ("A", ("step", 1)) and r.sample(2) == ("B", ("sample", 2))
    assert getattr(target.Runner.step, P.PATCH_MARK) == "p-step"
    assert target.Runner.__vsp_patches__ == {"p-step": P.SUPPORTED_VLLM_VERSIONS,
                                             "p-sample": P.SUPPORTED_VLLM_VERSIONS}
    assert P.original_of(target.Runner.step)(r, 3) == ("step", 3)


def test_refuses_an_attribute_another_plugin_replaced(target):
    orig = target.Runner.sample

    @functools.wraps(orig)
    def theirs(self, x):
        return ("theirs", orig(self, x))

    target.Runner.sample = theirs
    before = target.Runner.step
    with pytest.raises(P.PatchConflictError, match=r"Runner\.sample .* already replaced"):
        P.apply_patches([decl("p-step", "step", "A"), decl("p-sample", "sample", "B")])
    # every target is checked before anything is replaced: step is untouched
    assert target.Runner.step is before and target.Runner.sample is theirs


def test_refuses_a_foreign_module_function(target):
    def elsewhere(self, x):
        return x

    target.Runner.step = elsewhere  # defined in this test module, not vLLM
    with pytest.raises(P.PatchConflictError, match="another vLLM plugin"):
        P.apply_patches([decl("p-step", "step", "A")])


def test_declared_patches_match_installed_vllm():
    pytest.importorskip("vllm")
    for p in P.REGISTRATION_PATCHES + P.RUNNER_PATCHES:
        owner = p.resolve_owner()
        fn = getattr(owner, p.attribute)
        assert callable(fn), p.target
        assert p.why, f"{p.name}: say why"
        assert P._is_original(P.original_of(fn), p), p.target
