"""Every numba kernel of the proposers releases the GIL (a trie built on the
integration layer's background thread must not stall the engine step) and
keeps its on-disk cache (no recompilation at every engine start)."""

import importlib

import pytest


@pytest.mark.parametrize("module, at_least", [("suffix_tree", 20), ("token_recycling", 6)])
def test_kernels_release_the_gil_and_are_cached(module, at_least):
    from numba.core.caching import NullCache
    from numba.core.registry import CPUDispatcher

    mod = importlib.import_module(f"vllm_spec_plugins.proposers.{module}")
    kernels = [v for v in vars(mod).values() if isinstance(v, CPUDispatcher)]
    assert len(kernels) >= at_least
    for k in kernels:
        assert k.targetoptions.get("nogil") is True, k.py_func.__name__
        assert not isinstance(k._cache, NullCache), k.py_func.__name__
