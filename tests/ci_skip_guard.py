"""Under CI, engine / server / Ray tests may not pass by not running.

Locally a missing package (``pytest.importorskip("vllm")``, ``"ray"``, ...) or an
unprovisioned model skips those tests, which is what a developer without the
engine wants. In CI (``CI=true`` or ``CI=1``, as GitHub Actions, GitLab and most
runners set it) such a skip would turn the slow, important tests into a green
run that tested nothing, so this plugin reports each of them as a failure that
says why:

* a skip while a test runs (in the test, a fixture or a ``skipif`` mark) of a test
  in an engine module or with the ``engine`` marker: the report becomes a failure
  (a skip in a fixture or from a `skipif` mark happens at setup and so shows as an
  error, as any setup failure does);
* a whole engine module skipped at collection (module-level
  ``pytest.importorskip`` or ``pytest.skip(allow_module_level=True)``): the module
  gets one test, ``skipped_module_in_ci``, that fails with the skip's reason, so
  the rest of the suite still runs.

Engine modules: ``test_engine_*.py``, ``test_ray_*.py``, ``test_bench_e2e.py``.
Expected failures (``xfail``) are left alone. ``tests/conftest.py`` loads these hooks;
``tests/test_ci_skip_guard.py`` tests them with ``pytester``.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import pytest

ENGINE_MODULE_PATTERNS = ("test_engine_*.py", "test_ray_*.py", "test_bench_e2e.py")
ENGINE_MARKER = "engine"
CI_VALUES = ("true", "1")
SKIPPED_MODULE_ITEM = "skipped_module_in_ci"


def in_ci() -> bool:
    """``CI`` is ``true`` or ``1`` (any case, surrounding spaces ignored)."""
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def is_engine_module(path: os.PathLike | str) -> bool:
    name = Path(path).name
    return any(fnmatch.fnmatchcase(name, pat) for pat in ENGINE_MODULE_PATTERNS)


def _is_engine_item(item: pytest.Item) -> bool:
    return is_engine_module(item.path) or item.get_closest_marker(ENGINE_MARKER) is not None


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (path, lineno, "Skipped: reason").
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        path, lineno, msg = longrepr
        return f"{msg} ({path}:{lineno + 1 if isinstance(lineno, int) else lineno})"
    return str(longrepr)


def _message(what: str, reason: str) -> str:
    return (f"{what} was skipped, and CI={os.environ.get('CI')!r}: engine, server and Ray tests "
            f"must run in CI, not pass by skipping.\n  skip reason: {reason}\n"
            "  Install what the test needs (vLLM, ray, the model: `vllm-spec-plugins models fetch "
            "smollm2-135m`), or run without CI=true to allow the skip.")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call):
    rep = yield
    if (rep.skipped and not hasattr(rep, "wasxfail") and in_ci() and _is_engine_item(item)):
        phase = "" if rep.when == "call" else f" (at {rep.when})"
        rep.longrepr = _message(f"{item.nodeid}{phase}", _skip_reason(rep.longrepr))
        rep.outcome = "failed"
    return rep


class SkippedModuleInCI(pytest.Item):
    """Stands in for an engine module that was skipped at collection under CI."""

    def __init__(self, *, reason: str, **kwargs):
        super().__init__(**kwargs)
        self.reason = reason
        self.add_marker(ENGINE_MARKER)  # `-m "not engine"` still deselects it

    def runtest(self) -> None:
        raise _ModuleSkippedInCI(_message(f"module {self.path.name}", self.reason))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, _ModuleSkippedInCI):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self.path, 0, f"{self.path.name} (skipped at collection)"


class _ModuleSkippedInCI(Exception):
    pass


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    rep = yield
    if (rep.skipped and isinstance(collector, pytest.Module) and in_ci()
            and is_engine_module(collector.path)):
        item = SkippedModuleInCI.from_parent(collector, name=SKIPPED_MODULE_ITEM,
                                             reason=_skip_reason(rep.longrepr))
        rep.outcome = "passed"
        rep.longrepr = None
        rep.result = [item]
    return rep
