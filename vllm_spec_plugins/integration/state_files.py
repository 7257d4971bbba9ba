"""A proposer's state files: checked at startup, saved off the engine step.

* ``check_state_paths``: every ``*_path`` setting (e.g. ``cache_path``,
  ``token_recycling.matrix_path``) must name a file that can be written: a
  directory, a missing directory or a read-only one fails at startup naming
  the setting, not at the first save.
* :class:`StateSaver`: saves (the proposer's files, then the draft budget's)
  every ``every`` finished requests on the
  background thread (holding the proposer lock: the step skips drafting while
  a save reads the state, it never waits for the disk) and once at exit.
  Only the rank that owns the replica's state saves (replica_sharing.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import traceback
from typing import Any, Iterator, Optional

from pydantic import BaseModel

from vllm_spec_plugins.engine_config import CONFIG_KEY, PluginConfigError

from .background import BackgroundWork

logger = logging.getLogger("vllm_spec_plugins")

#: At exit, wait this long for a step or a background job to release the proposer.
EXIT_LOCK_TIMEOUT_S = 30.0


def _settings(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str, Any]]:
    """(dotted name, field name, value) of every setting, nested models and
    lists of them (a cascade's levels) included."""
    for name, value in config:
        if isinstance(value, BaseModel):
            yield from _settings(value, f"{prefix}{name}.")
        elif isinstance(value, list) and value and all(isinstance(v, BaseModel) for v in value):
            for i, v in enumerate(value):
                yield from _settings(v, f"{prefix}{name}.{i}.")
        else:
            yield f"{prefix}{name}", name, value


def state_paths(config: BaseModel, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted setting name, path) of every ``*_path`` setting that is set."""
    for dotted, name, value in _settings(config, prefix):
        if name.endswith("_path") and isinstance(value, str) and value:
            yield dotted, value


def check_draft_models(config: BaseModel, prefix: str = "") -> None:
    """Raise PluginConfigError naming the setting if a draft model (a cascade
    level's ``model``, a diffusion ``drafter``) is not on this machine. Checked where the engine runs
    (startup, drafter), not where a Ray recipe is written."""
    from vllm_spec_plugins.config import (
        DiffusionConfig,
        DraftModelLevel,
        check_draft_model_path,
        resolve_drafter_path,
    )

    def walk(cfg: BaseModel, pre: str) -> None:
        if isinstance(cfg, DraftModelLevel):
            try:
                check_draft_model_path(cfg.model)
            except ValueError as e:
                raise PluginConfigError(f"additional_config.{CONFIG_KEY}.{pre}model: {e}") from None
        if isinstance(cfg, DiffusionConfig):
            from vllm_spec_plugins.proposers.block_drafter import read_spec

            try:
                read_spec(resolve_drafter_path(cfg.drafter))
            except ValueError as e:
                raise PluginConfigError(f"additional_config.{CONFIG_KEY}.{pre}drafter: {e}") from None
        for name, value in cfg:
            if isinstance(value, BaseModel):
                walk(value, f"{pre}{name}.")
            elif isinstance(value, list):
                for i, v in enumerate(value):
                    if isinstance(v, BaseModel):
                        walk(v, f"{pre}{name}.{i}.")

    walk(config, prefix)


def made_for_target(config: BaseModel) -> Optional[dict]:
    """What a learnt drafter named by ``config`` was made for (its record's
    target fields), or None for a method without one."""
    from vllm_spec_plugins.config import DiffusionConfig, resolve_drafter_path

    if not isinstance(config, DiffusionConfig):
        return None
    from vllm_spec_plugins.proposers.block_drafter import read_spec

    t = read_spec(resolve_drafter_path(config.drafter)).target
    return {"name": t.name, "architecture": t.architecture, "hidden_size": t.hidden_size,
            "vocab_size": t.vocab_size, "num_hidden_layers": t.num_layers}


def target_identity(model_config: Any) -> Optional[dict]:
    """What a learnt drafter or judge head is checked against: the serving
    target's architecture, hidden size, vocabulary and layer count (None
    without a model config)."""
    hf = getattr(model_config, "hf_config", None)
    if hf is None:
        return None
    return {"architecture": (getattr(hf, "architectures", None) or ["?"])[0],
            "hidden_size": getattr(hf, "hidden_size", None),
            "vocab_size": getattr(hf, "vocab_size", None),
            "num_hidden_layers": getattr(hf, "num_hidden_layers", None)}


def check_made_for(made: dict, model_config: Any, method: str) -> None:
    """PluginConfigError naming both sides if the serving target's config
    differs from what the drafter was made for (architecture, hidden size,
    vocabulary, layers)."""
    target = target_identity(model_config)
    if not made or target is None:
        return
    diff = [f"{k}: drafter {made[k]!r}, target {v!r}" for k, v in target.items()
            if k in made and v is not None and made[k] != v]
    if diff:
        raise PluginConfigError(
            f"additional_config.{CONFIG_KEY}.drafter: method {method!r} uses a drafter made "
            f"for {made.get('name')!r}, but the target {getattr(model_config, 'model', '?')!r} "
            f"differs ({'; '.join(diff)}); train one for this target: "
            "vllm-spec-plugins train-drafter --target MODEL")


def check_state_paths(config: BaseModel, prefix: str = "") -> None:
    """Raise PluginConfigError naming the setting if a state file cannot be written."""
    for field, path in state_paths(config, prefix):
        where = f"additional_config.{CONFIG_KEY}.{field}"
        full = os.path.abspath(os.path.expanduser(path))
        parent = os.path.dirname(full)
        if os.path.isdir(full):
            raise PluginConfigError(f"{where}: {path!r} is a directory; name a file in it "
                                    f"(e.g. {os.path.join(path, 'state.npz')!r})")
        if not os.path.isdir(parent):
            raise PluginConfigError(f"{where}: directory {parent!r} does not exist; create it "
                                    "or choose another path")
        if not os.access(parent, os.W_OK | os.X_OK) or (
                os.path.exists(full) and not os.access(full, os.W_OK)):
            raise PluginConfigError(f"{where}: {path!r} cannot be written by this process; "
                                    "choose a writable path")


class StateSaver:
    def __init__(self, proposer: Any, background: BackgroundWork, every: int = 256,
                 enabled: bool = True, after_save=None, also_save: tuple = ()) -> None:
        self.proposer = proposer
        self.also_save = tuple(also_save)  # more ``save_state``-like calls (the draft budget)
        self.background = background
        self.every = max(1, int(every))
        self.enabled = enabled
        self._after = after_save  # runs under the lock after a save (deferred finishes)
        self._finished = 0
        self._saving = None
        self.saves = 0
        if enabled:
            atexit.register(self.save_at_exit)

    def on_finished(self, n: int = 1) -> None:
        """Count finished requests; every ``every`` of them, save in the background."""
        if not self.enabled or n <= 0:
            return
        before = self._finished
        self._finished += n
        if self._finished // self.every > before // self.every:
            if self._saving is None or self._saving.done():
                self._saving = self.background.submit_locked(
                    "saving the proposer state", self._save, after=self._after)

    def _save(self) -> None:
        saved = bool(self.proposer.save_state())
        for save in self.also_save:
            saved = bool(save()) or saved
        if saved:
            self.saves += 1

    def save_now(self, timeout_s: float = EXIT_LOCK_TIMEOUT_S) -> bool:
        """Save from this thread, waiting for the proposer lock (at exit, or on
        request; never from the step loop). Returns whether it saved."""
        lock = self.background.proposer_lock
        if not lock.acquire(timeout=timeout_s):
            logger.warning("vllm-spec-plugins: proposer busy for %.0f s; state not saved",
                           timeout_s)
            return False
        try:
            self._save()
            return True
        except Exception:  # noqa: BLE001
            logger.warning("vllm-spec-plugins: could not save the proposer state:\n%s",
                           traceback.format_exc())
            return False
        finally:
            lock.release()

    def save_at_exit(self) -> None:
        self.save_now()

    def close(self) -> None:
        """No exit-time save any more (the drafter is discarded)."""
        atexit.unregister(self.save_at_exit)
