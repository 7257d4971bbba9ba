"""Every vLLM touch point of vllm-spec-plugins, one module per responsibility.

Read in this order:

* ``versions``: the vLLM versions the patches were written for; what happens
  on another one (a warning at registration, an error only where selected).
* ``registration``: ``register()``, the ``vllm.general_plugins`` entry point,
  and startup validation of the plugin's settings in the user's process.
* ``patches``: every change made to vLLM, declared in one place (target,
  versions, why); applied once, all originals captured first, conflicts refused.
* ``drafter``: ``PluginDrafter``, the class vLLM's custom-proposer path builds
  in each worker; adapts vLLM's ``propose`` to a ``Proposer``.
* ``lifecycle``: the request table, the one record of live requests and their
  proposer state; long prompts prepared off the step.
* ``background``: the background thread and the proposer lock (the step never
  waits on a save, an import or a long prompt).
* ``target_signals``: what the target computed (top-k now, hidden states next).
* ``scoring``: lossy scorers in vLLM's verification step (any proposer):
  per-request lossy flags, hidden states, the relaxed accept rule, metrics.
* ``step_timing``: decode-step timing for the measured draft price.
* ``state_files``: state files (and draft models) checked at startup, state
  saved in the background.
* ``server_metrics``: the drafter's counters on the OpenAI server's ``/metrics``.
* ``replica_sharing``: which rank owns shared state; glue to ``sharing.py``.
* ``rpc``: functions for ``llm.collective_rpc`` (snapshots, draft timer).
* ``vllm_cpu_fixes``: a fix for a vLLM 0.32 CPU-build bug that breaks sampling
  with speculative decoding (applied by ``patches`` on that build only).

Engine options (config keys, the drafter's class path, the
``speculative_config`` builder) are defined once in ``engine_config`` (no vLLM).
Nothing here imports vLLM or numba at module level: ``register()`` runs in
every vLLM process before the worker initialises.
"""

from vllm_spec_plugins.engine_config import (  # noqa: F401 (the public names)
    CONFIG_KEY,
    DRAFTER_CLASS_PATH,
    SHARING_KEY,
    sharing_config,
    speculative_config,
)

from .drafter import PluginDrafter  # noqa: F401
from .registration import register, validate_engine_config  # noqa: F401
from .rpc import (  # noqa: F401
    draft_timer_snapshot,
    drafter_snapshot,
    flush_shared_state,
    install_draft_timer,
    save_proposer_state,
    scorer_snapshot,
)
from .versions import (  # noqa: F401
    ALLOW_UNSUPPORTED_ENV,
    SUPPORTED_VLLM_VERSIONS,
    check_vllm_version,
)
