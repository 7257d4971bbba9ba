"""Shared plumbing of the Ray Serve tests: a local Ray head started with the
`ray` CLI, and `serve run` of a config file until a readiness check passes."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Callable, Iterator

import pytest

BIN = os.path.dirname(sys.executable)
SERVE_PORT = 8000


def ray_cli(*args: str, env=None, check=True) -> subprocess.CompletedProcess:
    return subprocess.run([os.path.join(BIN, "ray"), *args], env=env, check=check,
                          capture_output=True, text=True, timeout=180)


def http_get(url: str, timeout: float = 5.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def serve_env() -> dict[str, str]:
    return dict(os.environ, VLLM_PLUGINS="vllm_spec_plugins", HF_HUB_OFFLINE="1",
                RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0")


@contextlib.contextmanager
def ray_head(env: dict[str, str], *extra: str) -> Iterator[None]:
    """A fresh local Ray head (any leftover one stopped first), stopped after."""
    if shutil.which("ray", path=BIN) is None:
        pytest.skip("ray CLI not installed")
    ray_cli("stop", "--force", env=env, check=False)
    ray_cli("start", "--head", "--include-dashboard", "false", "--disable-usage-stats",
            *extra, env=env)
    try:
        yield
    finally:
        ray_cli("stop", "--force", env=env, check=False)


@contextlib.contextmanager
def serve_run(config_path, log_path, env: dict[str, str], ready: Callable[[], bool],
              timeout_s: float = 480.0) -> Iterator[None]:
    """`serve run` the config; yields once ``ready()`` is true (connection
    errors count as not yet); stops it (SIGINT, then SIGKILL) after."""
    log = open(log_path, "w")
    proc = subprocess.Popen([os.path.join(BIN, "serve"), "run", "--address", "auto",
                             str(config_path)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)

    def tail() -> str:
        with open(log_path) as f:
            return f.read()[-4000:]

    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve run exited {proc.returncode}:\n{tail()}")
            try:
                if ready():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"serve run not ready in {timeout_s:.0f} s:\n{tail()}")
            time.sleep(3)
        yield
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
