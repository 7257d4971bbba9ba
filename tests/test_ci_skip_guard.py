"""The CI skip guard (ci_skip_guard.py, loaded by conftest.py), run on throwaway
test modules with ``pytester``: under CI=true a skipped engine test fails and
says why; without CI it skips as before; other modules keep their skips."""

from __future__ import annotations

import sys

import pytest

from ci_skip_guard import SKIPPED_MODULE_ITEM, in_ci, is_engine_module

pytest_plugins = ["pytester"]

MODULE_SKIP = """
import pytest
pytest.importorskip("no_such_module_xyz")

def test_never_runs():
    pass
"""

SKIPS_INSIDE = """
import pytest

@pytest.fixture
def needs_thing():
    pytest.skip("thing not provisioned")

def test_skip_in_body():
    pytest.skip("no engine here")

def test_skip_in_fixture(needs_thing):
    pass

@pytest.mark.skipif(True, reason="marked away")
def test_skipif_mark():
    pass

@pytest.mark.xfail(reason="known bug", strict=False)
def test_expected_failure():
    assert False

def test_passes():
    pass
"""

MARKED_SKIP = """
import pytest

@pytest.mark.engine
def test_marked_engine():
    pytest.skip("no engine here")

def test_unmarked():
    pytest.skip("fine to skip")
"""


@pytest.fixture
def run(pytester, monkeypatch):
    pytester.makeini("[pytest]\nmarkers =\n    engine: runs the real engine\n")
    # wired as in tests/conftest.py
    pytester.makeconftest("from ci_skip_guard import pytest_make_collect_report, "
                          "pytest_runtest_makereport  # noqa: F401\n")

    def _run(ci: str | None, *args):
        if ci is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", ci)
        return pytester.runpytest("-rA", *args)

    return _run


@pytest.mark.parametrize("value,expected", [("true", True), ("TRUE", True), (" True ", True),
                                            ("1", True), ("false", False), ("0", False),
                                            ("", False), ("yes", False)])
def test_in_ci_reads_the_ci_variable(monkeypatch, value, expected):
    monkeypatch.setenv("CI", value)
    assert in_ci() is expected
    monkeypatch.delenv("CI")
    assert in_ci() is False


def test_engine_module_names():
    for name in ("test_engine_suffix_tree.py", "tests/test_engine_x.py", "test_ray_serve.py",
                 "test_bench_e2e.py"):
        assert is_engine_module(name), name
    for name in ("test_bench_online.py", "test_suffix_tree.py", "engine_utils.py",
                 "test_bench_e2e_extra.py", "test_rayfoo.py"):
        assert not is_engine_module(name), name


@pytest.mark.parametrize("modname", ["test_engine_fake", "test_ray_fake", "test_bench_e2e"])
def test_module_level_importorskip_fails_in_ci(run, pytester, monkeypatch, modname):
    # In the full suite the real tests/test_bench_e2e.py is already imported under
    # this name; the in-process run would pick it up instead of the throwaway file.
    monkeypatch.delitem(sys.modules, modname, raising=False)
    pytester.makepyfile(**{modname: MODULE_SKIP})
    res = run("true")
    res.assert_outcomes(failed=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    out = res.stdout.str()
    assert f"FAILED {modname}.py::{SKIPPED_MODULE_ITEM}" in out
    assert "must run in CI" in out and "no_such_module_xyz" in out


@pytest.mark.parametrize("ci", [None, "false", "0"])
def test_module_level_importorskip_skips_outside_ci(run, pytester, ci):
    pytester.makepyfile(test_engine_fake=MODULE_SKIP)
    res = run(ci)
    res.assert_outcomes(skipped=1)
    assert res.ret == pytest.ExitCode.NO_TESTS_COLLECTED
    assert "no_such_module_xyz" in res.stdout.str()
    assert "must run in CI" not in res.stdout.str()


def test_module_skip_in_ci_does_not_stop_other_modules(run, pytester):
    pytester.makepyfile(test_engine_fake=MODULE_SKIP,
                        test_plain=MODULE_SKIP.replace("no_such_module_xyz", "no_such_module_abc"),
                        test_other="def test_ok():\n    pass\n")
    res = run("1")
    # the non-engine module keeps its skip; the plain test still runs
    res.assert_outcomes(failed=1, passed=1, skipped=1)


def test_module_skip_in_ci_is_deselected_with_not_engine(run, pytester):
    pytester.makepyfile(test_engine_fake=MODULE_SKIP, test_other="def test_ok():\n    pass\n")
    res = run("true", "-m", "not engine")
    res.assert_outcomes(passed=1, deselected=1)
    assert res.ret == pytest.ExitCode.OK


def test_skips_inside_an_engine_module_fail_in_ci(run, pytester):
    pytester.makepyfile(test_engine_fake=SKIPS_INSIDE)
    res = run("TRUE")
    # a skip in the body -> failed; in a fixture or a skipif mark (both at setup) ->
    # error, as any setup failure; xfail untouched
    res.assert_outcomes(failed=1, errors=2, passed=1, xfailed=1)
    assert res.ret == pytest.ExitCode.TESTS_FAILED
    out = res.stdout.str()
    assert "FAILED test_engine_fake.py::test_skip_in_body" in out
    assert "ERROR test_engine_fake.py::test_skipif_mark" in out
    assert "ERROR test_engine_fake.py::test_skip_in_fixture" in out
    for reason in ("no engine here", "thing not provisioned", "marked away"):
        assert reason in out, reason
    assert "test_engine_fake.py::test_skip_in_fixture (at setup) was skipped" in out


def test_skips_inside_an_engine_module_skip_outside_ci(run, pytester):
    pytester.makepyfile(test_engine_fake=SKIPS_INSIDE)
    res = run(None)
    res.assert_outcomes(skipped=3, passed=1, xfailed=1)
    assert res.ret == pytest.ExitCode.OK


def test_engine_marker_outside_engine_modules(run, pytester):
    pytester.makepyfile(test_bench_online_fake=MARKED_SKIP)
    res = run("true")
    res.assert_outcomes(failed=1, skipped=1)
    assert "FAILED test_bench_online_fake.py::test_marked_engine" in res.stdout.str()
    run(None).assert_outcomes(skipped=2)

