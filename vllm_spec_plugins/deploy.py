"""Ray deployment recipes: Ray Serve LLM configs and KubeRay manifests.

One source of truth for the YAML in ``deploy/``: :func:`serve_config` builds
a ``serve run`` config for a method of this package (its app builder,
:func:`build_openai_app`, is Ray Serve LLM's plus a check that the plugin
can be imported where the replicas run), :func:`rayservice_manifest` wraps the same config in a KubeRay
``RayService`` (``serveConfigV2`` is that YAML, verbatim). Tests check that
the committed files are what these functions produce, so the recipes cannot
drift from the code. Ray is imported only inside the functions that need it;
vLLM never.

CPU vs GPU. Ray Serve LLM runs vLLM's ``mp`` executor when the deployment is
a CPU one (``accelerator_config: {kind: cpu}``; vLLM's own Ray executor
refuses the CPU platform) and the ``ray`` executor on GPUs, where
``tensor_parallel_size`` spreads one replica over several GPUs.

CPU preload. A CPU config can carry ``LD_PRELOAD`` (Intel OpenMP, tcmalloc) in
its ``runtime_env.env_vars``: Ray starts the replica's worker process with it,
and vLLM's engine processes inherit it. ``deploy serve`` adds it when
``VSP_CPU_PRELOAD`` asks for it and the libraries are present on the machine
that writes the config (``cpu_runtime``), or as given with ``--ld-preload``.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Literal, Optional

from vllm_spec_plugins import cpu_runtime, engine_config
from vllm_spec_plugins.engine_config import DRAFTER_CLASS_PATH, selects_plugin
from vllm_spec_plugins.registry import METHODS, PluginConfigError

__all__ = ["speculative_engine_kwargs", "serve_config", "rayservice_manifest", "dump_yaml", "RECIPES",
           "DRAFTER_CLASS_PATH", "PLUGIN_ENV", "APP_BUILDER", "build_openai_app",
           "check_plugin_importable", "PluginMissingError", "cpu_preload_env_vars"]

# Every vLLM process of a replica loads the plugin (and only it) through this.
PLUGIN_ENV = {"VLLM_PLUGINS": "vllm_spec_plugins"}
#: KV cache per CPU replica (a CPU node serves a few concurrent requests).
CPU_KV_CACHE_BYTES = 4 << 30
#: The recipes' ``import_path``: Ray Serve LLM's builder behind a plugin check.
APP_BUILDER = "vllm_spec_plugins.deploy:build_openai_app"

#: The committed recipes: deploy/serve/<name>.yaml -> (method, target).
RECIPES: dict[str, tuple[str, str]] = {
    "suffix_tree.cpu": ("suffix_tree", "cpu"),
    "suffix_tree.gpu": ("suffix_tree", "gpu"),
    "token_recycling.cpu": ("token_recycling", "cpu"),
    "token_recycling.gpu": ("token_recycling", "gpu"),
    "suffix_recycling.cpu": ("suffix_recycling", "cpu"),
    "suffix_recycling.gpu": ("suffix_recycling", "gpu"),
    "cascade.cpu": ("cascade", "cpu"),
    "cascade.gpu": ("cascade", "gpu"),
}


def _cascade_pair(drafter: str, dtype: str) -> dict[str, Any]:
    """Cascade settings: the Qwen2.5-Coder-0.5B drafter checking the suffix
    tree's and n-gram lookup's proposals."""
    return {"levels": [{"type": "draft_model", "model": drafter, "dtype": dtype},
                       {"type": "suffix_tree"}, {"type": "ngram"}]}


#: Recipes that are not "the method with its defaults on the usual target":
#: the cascade serves the Qwen2.5-Coder pair (1.5B target, 0.5B drafter, one
#: tokenizer). On GPU one GPU per replica holds both models (the drafter runs
#: on the worker's own GPU: the target is small, so tensor parallelism would
#: only split the drafter's verifications across a link for nothing); on CPU
#: both come from the image (Dockerfile, WITH_QWEN_PAIR=1).
RECIPE_OVERRIDES: dict[str, dict[str, Any]] = {
    "cascade.cpu": dict(model_id="qwen2.5-coder-1.5b",
                        model_source="/models/qwen2.5-coder-1.5b/hf",
                        settings=_cascade_pair("/models/qwen2.5-coder-0.5b/hf", "float32")),
    "cascade.gpu": dict(model_id="qwen2.5-coder-1.5b",
                        model_source="Qwen/Qwen2.5-Coder-1.5B-Instruct",
                        settings=_cascade_pair("Qwen/Qwen2.5-Coder-0.5B-Instruct", "bfloat16"),
                        tensor_parallel_size=1,
                        # vLLM does not count the drafter's weights and caches:
                        # leave them room outside its KV-cache reservation.
                        engine_kwargs={"gpu_memory_utilization": 0.75}),
}


def speculative_engine_kwargs(method: str, num_speculative_tokens: int = 8,
                              settings: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The vLLM engine arguments that turn on ``method`` (validated: a bad
    setting raises ValueError naming it), for any Ray or vLLM entry point."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(sorted(METHODS))}")
    try:
        return engine_config.engine_kwargs(method, num_speculative_tokens, settings)
    except PluginConfigError as e:
        raise ValueError(str(e)) from None


def cpu_preload_env_vars(environ: Optional[dict[str, str]] = None,
                         libs: Optional[cpu_runtime.CpuRuntimeLibs] = None) -> dict[str, str]:
    """``{"LD_PRELOAD": ...}`` for CPU engine processes when ``VSP_CPU_PRELOAD``
    asks for it and the libraries are present here; ``{}`` otherwise. The paths
    are this machine's: the nodes must have them at the same place (true when
    the config is written inside the image the nodes run)."""
    switch = cpu_runtime.switch_value(environ)
    if switch == "0":
        return {}
    libs = cpu_runtime.find_libraries() if libs is None else libs
    # A CPU deployment runs vLLM's CPU build on the nodes, whatever is installed here.
    paths = cpu_runtime.libraries_to_preload(switch, libs, cpu_build=True)
    return {"LD_PRELOAD": ":".join(paths)} if paths else {}


def serve_config(method: str, *, model_id: str, model_source: str,
                 target: Literal["cpu", "gpu"] = "cpu",
                 num_speculative_tokens: int = 8,
                 settings: Optional[dict[str, Any]] = None,
                 min_replicas: int = 1, max_replicas: int = 1,
                 tensor_parallel_size: int = 1,
                 accelerator_type: Optional[str] = None,
                 engine_kwargs: Optional[dict[str, Any]] = None,
                 pip: Optional[list[str]] = None,
                 sharing: Optional[dict[str, Any]] = None,
                 ld_preload: Optional[str] = None,
                 app_name: str = "llm", route_prefix: str = "/") -> dict[str, Any]:
    """A ``serve run`` config serving ``model_source`` as ``model_id`` with
    this package's ``method`` (settings validated here, so a typo fails now,
    not in a replica). ``pip``: packages for the replica's runtime env
    (e.g. ``["vllm-spec-plugins==0.1.0"]``); None = already in the image.
    ``sharing``: replicas share what the proposer learns through a Ray actor
    (``SharingConfig`` fields; ``{}`` = the defaults). ``ld_preload``: the
    replicas' LD_PRELOAD on CPU (see :func:`cpu_preload_env_vars`); None or
    empty = not set."""
    if target not in ("cpu", "gpu"):
        raise ValueError(f"target must be 'cpu' or 'gpu', got {target!r}")
    if not 1 <= min_replicas <= max_replicas:
        raise ValueError("replicas: need 1 <= min_replicas <= max_replicas")
    kwargs: dict[str, Any] = {"dtype": "bfloat16", "max_model_len": 4096,
                              **speculative_engine_kwargs(method, num_speculative_tokens,
                                                          settings)}
    if target == "gpu":
        kwargs["tensor_parallel_size"] = int(tensor_parallel_size)
    else:
        # vLLM's CPU build otherwise reserves 92% of the node's memory for the
        # KV cache and refuses to start when that much is not free (it never
        # is next to Ray's own processes). Override in engine_kwargs.
        kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    if ld_preload and target != "cpu":
        raise ValueError("ld_preload: Intel OpenMP / tcmalloc preloading is for target 'cpu' "
                         "(vLLM's CPU build); drop it for GPU replicas")
    if target != "gpu" and tensor_parallel_size != 1:
        raise ValueError("tensor_parallel_size > 1 needs target 'gpu' (vLLM's CPU "
                         "build runs one worker per replica here)")
    if sharing is not None:
        try:
            kwargs["additional_config"] = engine_config.engine_kwargs(
                method, num_speculative_tokens, settings, sharing)["additional_config"]
        except PluginConfigError as e:  # names the field
            raise ValueError(str(e)) from None
    kwargs.update(copy.deepcopy(engine_kwargs or {}))
    runtime_env: dict[str, Any] = {"env_vars": dict(PLUGIN_ENV)}
    if ld_preload:
        runtime_env["env_vars"]["LD_PRELOAD"] = ld_preload
    if pip:
        runtime_env["pip"] = list(pip)
    llm: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": model_source},
        "deployment_config": {"autoscaling_config": {"min_replicas": int(min_replicas),
                                                     "max_replicas": int(max_replicas)}},
        "engine_kwargs": kwargs,
        "runtime_env": runtime_env,
    }
    if target == "cpu":
        llm["accelerator_config"] = {"kind": "cpu"}
    elif accelerator_type:
        llm["accelerator_type"] = accelerator_type
    return {"applications": [{
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": APP_BUILDER,
        "args": {"llm_configs": [llm]},
    }]}


def rayservice_manifest(serve_cfg: dict[str, Any], *, name: str, image: str,
                        worker_replicas: int = 1, worker_cpus: int = 8,
                        worker_memory: str = "32Gi", worker_gpus: int = 0) -> dict[str, Any]:
    """A KubeRay ``RayService`` whose ``serveConfigV2`` is ``serve_cfg`` as
    YAML text (the same document ``serve run`` takes)."""
    def container(role: str, cpus: int, memory: str, gpus: int) -> dict[str, Any]:
        limits: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
        if gpus:
            limits["nvidia.com/gpu"] = str(gpus)
        c: dict[str, Any] = {"name": f"ray-{role}", "image": image,
                             "resources": {"limits": limits, "requests": dict(limits)},
                             "env": [{"name": k, "value": v} for k, v in PLUGIN_ENV.items()]}
        if role == "head":
            c["ports"] = [{"containerPort": 6379, "name": "gcs"},
                          {"containerPort": 8265, "name": "dashboard"},
                          {"containerPort": 10001, "name": "client"},
                          {"containerPort": 8000, "name": "serve"}]
        return c

    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": {"name": name},
        "spec": {
            "serveConfigV2": dump_yaml(serve_cfg),
            "rayClusterConfig": {
                "headGroupSpec": {
                    # The head only schedules: no replica lands on it.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {"spec": {"containers": [container("head", 2, "8Gi", 0)]}},
                },
                "workerGroupSpecs": [{
                    "groupName": "gpu-workers" if worker_gpus else "cpu-workers",
                    "replicas": int(worker_replicas),
                    "minReplicas": int(worker_replicas),
                    "maxReplicas": max(int(worker_replicas), 4),
                    "rayStartParams": {},
                    "template": {"spec": {"containers": [
                        container("worker", worker_cpus, worker_memory, worker_gpus)]}},
                }],
            },
        },
    }


#: Where the image recipe (deploy/kuberay/Dockerfile) provisions the default
# ------------------------------------------------------------ app builder
class PluginMissingError(RuntimeError):
    """vllm-spec-plugins cannot be imported where an engine would run."""


def check_plugin_importable(runtime_env: Optional[dict[str, Any]] = None,
                            where: str = "the replicas", timeout_s: float = 900.0) -> None:
    """Import the plugin in a Ray task with ``runtime_env`` (what a replica
    or a Ray Data engine actor gets); raise :class:`PluginMissingError`
    naming the fix if it fails. Without this check the user sees only
    vLLM's "Engine core initialization failed", with the cause in a
    replica's log. The task runs on any node: a cluster whose nodes have
    different images can still differ."""
    import ray

    def probe() -> Optional[str]:  # nested: pickled by value, needs no plugin to load
        import importlib

        try:
            importlib.import_module("vllm_spec_plugins.integration")
        except Exception as e:  # noqa: BLE001 - reported to the caller
            return f"{type(e).__name__}: {e}"
        return None

    task = ray.remote(num_cpus=0)(probe).options(runtime_env=runtime_env or None)
    err = ray.get(task.remote(), timeout=timeout_s)
    if err:
        raise PluginMissingError(
            f"vllm-spec-plugins cannot be imported where {where} run ({err}); vLLM there "
            f"could not load the proposer {DRAFTER_CLASS_PATH}. Install the package in the "
            "image (pip install vllm-spec-plugins), or add it to the runtime_env's pip list "
            "(`vllm-spec-plugins deploy serve --pip vllm-spec-plugins`).")


def _uses_plugin(llm_config: Any) -> bool:
    kwargs = (llm_config.get("engine_kwargs") if isinstance(llm_config, dict)
              else getattr(llm_config, "engine_kwargs", None)) or {}
    spec = kwargs.get("speculative_config") or {}
    return isinstance(spec, dict) and selects_plugin(spec)


def build_openai_app(args: dict[str, Any]):
    """``ray.serve.llm:build_openai_app`` after checking, for every LLM
    config that uses this package, that its runtime env can import it."""
    from ray.serve.llm import build_openai_app as ray_build_openai_app

    for cfg in (args or {}).get("llm_configs") or []:
        if _uses_plugin(cfg):
            model = ((cfg.get("model_loading_config") or {}).get("model_id")
                     if isinstance(cfg, dict) else None)
            env = cfg.get("runtime_env") if isinstance(cfg, dict) else getattr(
                cfg, "runtime_env", None)
            check_plugin_importable(env, where=f"the replicas of model {model!r}")
    return ray_build_openai_app(args)


#: model: VSP_MODEL_CACHE=/models, then ``vllm-spec-plugins models fetch``.
IMAGE_MODEL_SOURCE = "/models/smollm2-135m/hf"


def recipe(name: str, *, model_source: Optional[str] = None,
           model_id: Optional[str] = None) -> dict[str, Any]:
    """The serve config of a committed recipe (``RECIPES``): on CPU the
    default model where the image recipe puts it; on GPU a Qwen2.5-Coder
    target with tensor parallelism over 2 GPUs, the plugin from PyPI."""
    method, target = RECIPES[name]
    over = dict(RECIPE_OVERRIDES.get(name, {}))
    settings = over.pop("settings", None)
    if target == "cpu":
        return serve_config(method, target="cpu",
                            model_id=model_id or over.get("model_id", "smollm2-135m"),
                            model_source=model_source or over.get("model_source",
                                                                  IMAGE_MODEL_SOURCE),
                            settings=settings, engine_kwargs={"enforce_eager": True})
    return serve_config(method, target="gpu",
                        model_id=model_id or over.get("model_id", "qwen2.5-coder-7b"),
                        model_source=model_source or over.get(
                            "model_source", "Qwen/Qwen2.5-Coder-7B-Instruct"),
                        settings=settings,
                        tensor_parallel_size=over.get("tensor_parallel_size", 2),
                        engine_kwargs=over.get("engine_kwargs"),
                        accelerator_type="L4", min_replicas=1, max_replicas=4,
                        pip=["vllm-spec-plugins"])


def dump_yaml(obj: Any) -> str:
    """YAML in insertion order; multi-line strings (serveConfigV2) as ``|`` blocks."""
    import yaml

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2)


# ---------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="deploy_command", required=True)
    s = sub.add_parser("serve", help="a `serve run` config (Ray Serve LLM) for one method")
    s.add_argument("--method", required=True, help=f"one of {', '.join(sorted(METHODS))}")
    s.add_argument("--target", choices=["cpu", "gpu"], default="cpu")
    s.add_argument("--model", default="smollm2-135m",
                   help="a model name of `vllm-spec-plugins models list` (fetched, its local "
                        "path used), a local directory, or a hub id (GPU clusters)")
    s.add_argument("--model-id", help="name clients ask for (default: --model)")
    s.add_argument("--replicas", type=int, default=1, help="min replicas")
    s.add_argument("--max-replicas", type=int, help="max replicas (default: --replicas)")
    s.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per replica")
    s.add_argument("--accelerator-type", help="GPU type label, e.g. L4, A10G, H100")
    s.add_argument("-k", "--num-speculative-tokens", type=int, default=8)
    s.add_argument("--settings", default="{}",
                   help="JSON object of method settings (see configs/<method>.json)")
    s.add_argument("--engine-kwargs", default="{}", help="JSON object of extra vLLM engine args")
    s.add_argument("--pip", nargs="*", help="packages for the replicas' runtime env "
                                            "(default: none, the image has them)")
    s.add_argument("--share", nargs="?", const="{}", metavar="JSON",
                   help="replicas share what the proposer learns through a Ray actor; "
                        "optional JSON object of sharing settings (hub, interval_s, ...)")
    s.add_argument("--ld-preload", metavar="PATHS",
                   help="CPU: the replicas' LD_PRELOAD (default: Intel OpenMP and tcmalloc as "
                        "found on this machine when VSP_CPU_PRELOAD asks for them; '' = none)")
    s.add_argument("-o", "--output", help="write here instead of stdout")
    r = sub.add_parser("rayservice", help="a KubeRay RayService wrapping a serve config")
    r.add_argument("--serve-config", required=True, help="a `serve run` YAML file")
    r.add_argument("--name", default="vllm-spec-plugins")
    r.add_argument("--image", required=True, help="container image with the plugin installed")
    r.add_argument("--workers", type=int, default=1)
    r.add_argument("--worker-cpus", type=int, default=8)
    r.add_argument("--worker-memory", default="32Gi")
    r.add_argument("--worker-gpus", type=int, default=0)
    r.add_argument("-o", "--output")
    w = sub.add_parser("recipes", help="(re)write the committed recipes under deploy/")
    w.add_argument("--out", default="deploy", help="the deploy/ directory")


def _json_arg(text: str, flag: str) -> dict[str, Any]:
    from vllm_spec_plugins.json_input import parse_json_object

    return parse_json_object(text, flag)


def _write(text: str, output: Optional[str]) -> None:
    if output:
        from pathlib import Path

        Path(output).write_text(text)
        print(f"wrote {output}")
    else:
        print(text, end="")


def write_recipes(out: str) -> list[str]:
    """Write every committed recipe: serve configs and the KubeRay manifests."""
    from pathlib import Path

    root = Path(out)
    (root / "serve").mkdir(parents=True, exist_ok=True)
    (root / "kuberay").mkdir(parents=True, exist_ok=True)
    written = []
    for name in RECIPES:
        path = root / "serve" / f"{name}.yaml"
        path.write_text(RECIPE_HEADER.format(name=name) + dump_yaml(recipe(name)))
        written.append(str(path))
    for name in KUBERAY:
        path = root / "kuberay" / f"{name}.yaml"
        path.write_text(KUBERAY_HEADER.format(name=name) + dump_yaml(kuberay_manifest(name)))
        written.append(str(path))
    return written


def kuberay_manifest(name: str) -> dict[str, Any]:
    """The RayService of a committed KubeRay recipe (``KUBERAY``)."""
    spec = dict(KUBERAY[name])
    return rayservice_manifest(recipe(spec.pop("recipe")), **spec)


RECIPE_HEADER = ("# Generated by `vllm-spec-plugins deploy recipes` ({name}); tests check it\n"
                 "# matches the code. Run: serve run deploy/serve/{name}.yaml\n")
KUBERAY_HEADER = ("# Generated by `vllm-spec-plugins deploy recipes` ({name}); tests check it\n"
                  "# matches the code. Apply: kubectl apply -f deploy/kuberay/{name}.yaml\n")
#: deploy/kuberay/<name>.yaml -> the serve recipe it wraps + rayservice_manifest
#: arguments. Images: deploy/kuberay/Dockerfile (CPU) and Dockerfile.gpu.
KUBERAY: dict[str, dict[str, Any]] = {
    "rayservice-suffix-tree-cpu": dict(recipe="suffix_tree.cpu", name="spec-suffix-tree",
                                       image="vllm-spec-plugins:cpu", worker_cpus=8,
                                       worker_memory="32Gi"),
    "rayservice-suffix-recycling-gpu": dict(recipe="suffix_recycling.gpu",
                                            name="spec-suffix-recycling",
                                            image="vllm-spec-plugins:gpu", worker_cpus=16,
                                            worker_memory="64Gi", worker_gpus=2),
}


def run_cli(args) -> int:
    if args.deploy_command == "serve":
        from vllm_spec_plugins.models import MODELS, ensure_model

        source = str(ensure_model(args.model)) if args.model in MODELS else args.model
        ld_preload = args.ld_preload
        if ld_preload is None and args.target == "cpu":
            ld_preload = cpu_preload_env_vars().get("LD_PRELOAD")
            if ld_preload:
                import sys

                print(f"note: the replicas get LD_PRELOAD={ld_preload} (found on this machine; "
                      "the nodes need the same paths, else pass --ld-preload)", file=sys.stderr)
        cfg = serve_config(
            args.method, model_id=args.model_id or args.model, model_source=source,
            target=args.target, num_speculative_tokens=args.num_speculative_tokens,
            settings=_json_arg(args.settings, "--settings"),
            min_replicas=args.replicas, max_replicas=args.max_replicas or args.replicas,
            tensor_parallel_size=args.tensor_parallel_size,
            accelerator_type=args.accelerator_type,
            engine_kwargs=_json_arg(args.engine_kwargs, "--engine-kwargs"), pip=args.pip,
            sharing=None if args.share is None else _json_arg(args.share, "--share"),
            ld_preload=ld_preload)
        _write(dump_yaml(cfg), args.output)
        return 0
    if args.deploy_command == "rayservice":
        import yaml

        try:
            with open(args.serve_config) as f:
                cfg = yaml.safe_load(f)
        except OSError as e:
            raise ValueError(f"--serve-config: cannot read {args.serve_config}: "
                             f"{e.strerror or e}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"--serve-config: {args.serve_config} is not valid YAML ({e})") \
                from None
        if not isinstance(cfg, dict) or not cfg.get("applications"):
            raise ValueError(f"--serve-config: {args.serve_config} has no `applications` list "
                             "(make one with `vllm-spec-plugins deploy serve`)")
        manifest = rayservice_manifest(cfg, name=args.name, image=args.image,
                                       worker_replicas=args.workers,
                                       worker_cpus=args.worker_cpus,
                                       worker_memory=args.worker_memory,
                                       worker_gpus=args.worker_gpus)
        _write(dump_yaml(manifest), args.output)
        return 0
    for path in write_recipes(args.out):
        print(f"wrote {path}")
    return 0
