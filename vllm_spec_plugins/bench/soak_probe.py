"""Worker extension the memory soak (``bench/soak.py``) gives the server.

``--worker-extension-cls vllm_spec_plugins.bench.soak_probe.SoakProbe`` mixes
these methods into vLLM's worker class; with ``VLLM_SERVER_DEV_MODE=1`` the
server's ``POST /collective_rpc {"method": "vsp_soak_probe"}`` calls them in
every worker (on the CPU build the worker lives in the engine-core process).
They only read (the probe) or hand free heap back to the OS (the trim): the
engine's own behaviour is not changed. The results cross a process boundary
as msgpack, so only plain ints, floats, strings, dicts and None are returned.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Any, Optional


def _plugin_drafter(worker: Any) -> Any:
    from vllm_spec_plugins.integration.drafter import PluginDrafter

    drafter = getattr(getattr(worker, "model_runner", None), "drafter", None)
    return drafter if isinstance(drafter, PluginDrafter) else None


def plugin_state_bytes(proposer: Any) -> Optional[int]:
    """Bytes of the proposer's shared, cross-request state: the suffix tree's
    global response cache and Token Recycling's matrix (the hybrid holds one of
    each). None for a proposer with neither. Per-request state is not counted:
    it lives only while its request does (``tracked_requests`` shows that)."""
    total, found = 0, False
    for part in (proposer, getattr(proposer, "suffix", None), getattr(proposer, "recycling", None)):
        if part is None:
            continue
        tree = getattr(part, "global_tree", None)
        if tree is not None and hasattr(tree, "nbytes"):
            total, found = total + int(tree.nbytes), True
        matrix = getattr(part, "matrix", None)
        if matrix is not None and hasattr(matrix, "nbytes"):
            total, found = total + int(matrix.nbytes), True
    return total if found else None


class SoakProbe:
    """Methods mixed into vLLM's worker (their names must not clash with its own)."""

    def vsp_soak_probe(self) -> dict[str, Any]:
        """Python objects alive in this process and, when the engine runs the
        plugin's drafter, its request table and state sizes."""
        out: dict[str, Any] = {"gc_objects": len(gc.get_objects()), "plugin": None}
        drafter = _plugin_drafter(self)
        if drafter is not None:
            table = drafter.requests
            # Global responses cached by the suffix tree (none for other proposers).
            cached = None
            for part in (drafter.proposer, getattr(drafter.proposer, "suffix", None)):
                tree = getattr(part, "global_tree", None) if part is not None else None
                if tree is not None:
                    cached = {"responses": int(tree.num_sequences), "tokens": int(tree.num_tokens)}
            out["plugin"] = {
                "method": str(drafter.method),
                "tracked_requests": int(len(table)),
                "started": int(table.stats["started"]),
                "finished": int(table.stats["finished"]),
                "errors": int(table.stats["errors"]),
                "state_bytes": plugin_state_bytes(drafter.proposer),
                "global_cache": cached,
            }
        return out

    def vsp_soak_malloc_trim(self) -> bool:
        """Give freed heap memory back to the OS (glibc ``malloc_trim(0)``).
        What RSS loses then was free memory the allocator kept, not live data.
        False where the C library has no malloc_trim (musl, macOS)."""
        libc_name = ctypes.util.find_library("c")
        if not libc_name:
            return False
        try:
            trim = ctypes.CDLL(libc_name).malloc_trim
        except (OSError, AttributeError):
            return False
        gc.collect()
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
        return True
