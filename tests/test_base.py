"""proposers/base.py: atomic state-file saves and the clean-up of temp files
that an interrupted save left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from vllm_spec_plugins.proposers.base import (
    STALE_TEMP_AGE_S,
    remove_stale_temps,
    save_npz_atomic,
)


def dead_pid() -> int:
    """A pid no process has (os.kill says so)."""
    for pid in range(999_999_999, 999_999_999 - 1000, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    pytest.skip("no free pid found")


@pytest.fixture
def live_other_pid():
    """The pid of a live process other than this one (started here, ended after)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def temp_of(path, pid: int, tag: str = "abc123") -> str:
    """A temp file named as save_npz_atomic names its own: .<basename>.<pid>.<random>.tmp"""
    d, base = os.path.split(str(path))
    t = os.path.join(d, f".{base}.{pid}.{tag}.tmp")
    with open(t, "wb") as f:
        f.write(b"half-written")
    return t


def age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_save_writes_the_arrays_and_leaves_no_temp(tmp_path):
    path = tmp_path / "state.npz"
    a = np.arange(10, dtype=np.int32)
    b = np.linspace(0, 1, 7, dtype=np.float32)
    save_npz_atomic(str(path), a=a, b=b, version=np.int64(3))
    assert os.listdir(tmp_path) == ["state.npz"]
    with np.load(path) as z:
        assert sorted(z.files) == ["a", "b", "version"]
        assert np.array_equal(z["a"], a) and z["a"].dtype == np.int32
        assert np.array_equal(z["b"], b) and int(z["version"]) == 3
    # A second save replaces the file whole.
    save_npz_atomic(str(path), a=a[:3])
    with np.load(path) as z:
        assert z.files == ["a"] and z["a"].tolist() == [0, 1, 2]
    assert os.listdir(tmp_path) == ["state.npz"]


def test_temp_of_a_dead_process_is_removed_by_the_next_save(tmp_path):
    path = tmp_path / "m.npz"
    stale = temp_of(path, dead_pid())
    save_npz_atomic(str(path), x=np.ones(3))
    assert not os.path.exists(stale)
    assert os.listdir(tmp_path) == ["m.npz"]
    with np.load(path) as z:
        assert z["x"].tolist() == [1.0, 1.0, 1.0]


def test_fresh_temp_of_a_live_process_is_kept_and_an_old_one_removed(tmp_path, live_other_pid):
    path = tmp_path / "m.npz"
    fresh = temp_of(path, live_other_pid, "fresh1")  # another process mid-save
    old = temp_of(path, live_other_pid, "old111")
    age(old, STALE_TEMP_AGE_S + 60)
    save_npz_atomic(str(path), x=np.zeros(2))
    assert os.path.exists(fresh)
    assert not os.path.exists(old)
    assert sorted(os.listdir(tmp_path)) == sorted(["m.npz", os.path.basename(fresh)])
    with np.load(path) as z:
        assert z["x"].tolist() == [0.0, 0.0]


def test_remove_stale_temps_reports_and_only_touches_this_files_temps(tmp_path, live_other_pid):
    path = tmp_path / "m[1].npz"  # glob characters in the name are literal
    dead = temp_of(path, dead_pid())
    own = temp_of(path, os.getpid())  # a save of this process in progress
    live = temp_of(path, live_other_pid)
    other_file = temp_of(tmp_path / "other.npz", dead_pid())
    unrelated = tmp_path / "m[1].npz.bak"
    unrelated.write_bytes(b"x")
    assert remove_stale_temps(str(path)) == [dead]
    assert all(os.path.exists(p) for p in (own, live, other_file, unrelated))
    # The age limit applies to live processes' temps.
    age(live, 100)
    assert remove_stale_temps(str(path), max_age_s=1000) == []
    assert remove_stale_temps(str(path), max_age_s=50) == [live]
    assert os.path.exists(own) and os.path.exists(other_file)


def test_failed_save_removes_its_temp_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "m.npz"
    save_npz_atomic(str(path), x=np.arange(4))

    class Unsavable:
        def __array__(self, *a, **k):
            raise RuntimeError("cannot serialise")

    with pytest.raises(RuntimeError, match="cannot serialise"):
        save_npz_atomic(str(path), x=Unsavable())
    assert os.listdir(tmp_path) == ["m.npz"]
    with np.load(path) as z:
        assert z["x"].tolist() == [0, 1, 2, 3]
