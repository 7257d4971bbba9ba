"""vllm-spec-plugins: speculative-decoding proposers for vLLM, as a plugin.

Select a proposer with::

    speculative_config={"method": "custom_class",
                        "model": "vllm_spec_plugins.integration.PluginDrafter",
                        "num_speculative_tokens": 16}
    additional_config={"spec_plugins": {"method": "suffix_tree"}}

Importing this package imports neither vLLM nor numba.
"""

__version__ = "0.1.0"
