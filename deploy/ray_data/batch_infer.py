"""Ray Data batch inference with a speculative proposer of vllm-spec-plugins.

Reads a JSONL of prompts (one object per line: {"prompt": "..."} or
{"messages": [...]}; other fields are carried to the output), runs them
through Ray Data's vLLM processor with the chosen method, writes JSONL: each
input line's fields plus generated_text, num_generated_tokens and
rendered_prompt (the prompt after the chat template).

    python deploy/ray_data/batch_infer.py --input prompts.jsonl --output out/ \
        --model /models/smollm2-135m/hf --method suffix_tree --cpu

On a cluster: ``ray job submit --working-dir . -- python deploy/ray_data/batch_infer.py ...``
with the plugin installed in the image (or ``--pip vllm-spec-plugins``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, help="JSONL of prompts")
    p.add_argument("--output", required=True, help="output directory (JSONL files)")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--method", default="suffix_tree", help="a method of vllm-spec-plugins")
    p.add_argument("--settings", default="{}", help="JSON object of method settings")
    p.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=1, help="engine replicas")
    p.add_argument("--cpu", action="store_true",
                   help="CPU nodes (vLLM CPU build): engine workers on CPU bundles")
    p.add_argument("--kv-cache-gib", type=float, default=2.0,
                   help="KV cache per engine on CPU (vLLM's CPU build otherwise reserves "
                        "92%% of the node's memory and fails if that much is not free)")
    p.add_argument("--pip", nargs="*", help="packages for the engine actors' runtime env")
    p.add_argument("--num-cpus", type=int,
                   help="logical CPUs of a local Ray instance (one per pipeline stage is "
                        "reserved: a 2-core laptop needs ~6); ignored when joining a cluster")
    return p.parse_args(argv)


def read_prompts(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{n}: not valid JSON ({e.msg})")
            if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
                raise SystemExit(f"{path}:{n}: each line needs a \"prompt\" string or a "
                                 "\"messages\" list")
            rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no prompts")
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    from vllm_spec_plugins.deploy import (PLUGIN_ENV, PluginMissingError,
                                          check_plugin_importable, cpu_preload_env_vars,
                                          speculative_engine_kwargs)

    try:
        settings = json.loads(args.settings)
        spec_kwargs = speculative_engine_kwargs(args.method, args.num_speculative_tokens,
                                                settings)
    except (ValueError, json.JSONDecodeError) as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    rows = read_prompts(args.input)

    import ray

    # Before anything else touches Ray (building the processor starts a
    # default local instance otherwise, with one logical CPU per core).
    init = {"num_cpus": args.num_cpus} if args.num_cpus else {}
    ray.init(ignore_reinit_error=True, runtime_env={"env_vars": dict(PLUGIN_ENV)}, **init)
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    runtime_env = {"env_vars": dict(PLUGIN_ENV)}
    if args.pip:
        runtime_env["pip"] = list(args.pip)
    extra = {}
    if args.cpu:
        # CPU bundles only: Ray Data then schedules the engine without GPUs.
        extra["placement_group_config"] = {"bundles": [{"CPU": 1}]}
        engine_extra = {"kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30)),
                        "enforce_eager": True}
        # Intel OpenMP + tcmalloc for the engine actors when VSP_CPU_PRELOAD asks for them.
        runtime_env["env_vars"].update(cpu_preload_env_vars())
    else:
        engine_extra = {}
    config = vLLMEngineProcessorConfig(
        model_source=args.model,
        engine_kwargs={"dtype": args.dtype, "max_model_len": 4096, **engine_extra,
                       **spec_kwargs},
        runtime_env=runtime_env, batch_size=args.batch_size, concurrency=args.concurrency,
        **extra)
    sampling = {"temperature": args.temperature, "max_tokens": args.max_tokens}

    def preprocess(row: dict) -> dict:
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        # The stages rewrite "prompt" (chat template applied): carry the
        # input line as it was, to give it back unchanged.
        return {"input_row": json.dumps(row), "messages": messages, "sampling_params": sampling}

    def postprocess(row: dict) -> dict:
        return {**json.loads(row["input_row"]), "generated_text": row["generated_text"],
                "num_generated_tokens": int(row.get("num_generated_tokens") or 0),
                "rendered_prompt": row.get("prompt")}

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    try:  # fail now, naming the fix, not deep in an engine actor's log
        check_plugin_importable(runtime_env, where="the Ray Data engine actors")
    except PluginMissingError as e:
        print(f"batch_infer: error: {e}", file=sys.stderr)
        return 2
    ds = processor(ray.data.from_items(rows))
    Path(args.output).mkdir(parents=True, exist_ok=True)
    ds.write_json(args.output)
    print(f"wrote {len(rows)} rows to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
