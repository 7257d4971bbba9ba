"""Every public function and method of the proposer modules and config.py has
type hints that resolve (``from __future__ import annotations`` turns hints
into strings, so a name used in a hint but never imported goes unnoticed until
something, e.g. pydantic or a docs tool, evaluates it)."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import typing

import pytest

import vllm_spec_plugins.proposers as proposers_pkg

MODULES = sorted(["vllm_spec_plugins.config"] + [
    f"{proposers_pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(proposers_pkg.__path__)])


def _public(name: str) -> bool:
    return not name.startswith("_") or name in ("__init__", "__call__")


def _functions_of(cls):
    for name, attr in vars(cls).items():
        if not _public(name):
            continue
        if isinstance(attr, (staticmethod, classmethod)):
            yield name, attr.__func__
        elif isinstance(attr, property):
            for part, f in (("fget", attr.fget), ("fset", attr.fset)):
                if f is not None:
                    yield f"{name}.{part}", f
        elif inspect.isfunction(attr):
            yield name, attr


def hinted_objects(module_name: str):
    mod = importlib.import_module(module_name)
    for name, obj in vars(mod).items():
        if not _public(name) or getattr(obj, "__module__", None) != module_name:
            continue  # private, or imported from elsewhere (checked in its own module)
        if inspect.isclass(obj):
            yield name, obj
            for mname, f in _functions_of(obj):
                yield f"{name}.{mname}", f
        elif inspect.isfunction(obj):
            yield name, obj


def test_every_module_is_covered():
    assert {"vllm_spec_plugins.config", "vllm_spec_plugins.proposers.base",
            "vllm_spec_plugins.proposers.suffix_tree",
            "vllm_spec_plugins.proposers.token_recycling",
            "vllm_spec_plugins.proposers.suffix_recycling",
            "vllm_spec_plugins.proposers.step_cost"} <= set(MODULES)


@pytest.mark.parametrize("module_name", MODULES)
def test_type_hints_resolve(module_name):
    objs = list(hinted_objects(module_name))
    assert objs, f"{module_name}: nothing public found"
    failures = []
    for qualname, obj in objs:
        try:
            typing.get_type_hints(obj)
        except Exception as e:  # noqa: BLE001 - collect them all
            failures.append(f"{module_name}.{qualname}: {type(e).__name__}: {e}")
    assert not failures, "\n".join(failures)


def test_proposer_hooks_are_checked():
    """The contract's hooks are among what is checked (guards the walk above)."""
    names = {q for q, _ in hinted_objects("vllm_spec_plugins.proposers.token_recycling")}
    assert {"TokenRecyclingProposer.start_request", "TokenRecyclingProposer.propose_batch",
            "TokenRecyclingProposer.stats.fget", "best_chain", "DraftTree.build"} <= names
    names = {q for q, _ in hinted_objects("vllm_spec_plugins.proposers.suffix_tree")}
    assert {"SuffixTreeProposer.propose_scored", "SuffixTreeProposer.finish_request",
            "SuffixTree.draft", "warmup"} <= names
