"""The README's demo: the same prompts with and without the suffix-tree proposer.

Prints output tokens/s of each, the mean acceptance length, and whether the
greedy outputs are token-identical (float32, so near-ties cannot flip).

By default the terminal shows only progress lines and the result: vLLM's logs
and progress bars (its own and the engine process's, which inherits the file
descriptors) go to a log file the demo names. ``verbose=True`` shows them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, TextIO

DEFAULT_LOG_FILE = "vllm-spec-plugins-demo.log"
LOG_TAIL_LINES = 30  # shown when the demo fails, so the cause is on screen


def _spec_counters(llm) -> dict[str, float]:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode_num_") and hasattr(m, "value"):
            out[m.name.removeprefix("vllm:spec_decode_num_")] = float(m.value)
    return out


@contextlib.contextmanager
def output_to_file(log_path: Path) -> Iterator[TextIO]:
    """Send fd 1 and 2 (Python's and every child process's output) to ``log_path``;
    yield a stream that still writes to the original terminal."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    terminal = os.fdopen(os.dup(saved_out), "w", buffering=1)
    try:
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved_out, 1)
        os.dup2(saved_err, 2)
        for fd in (saved_out, saved_err, log_fd):
            os.close(fd)
        terminal.close()


class Progress:
    """One line per phase on the terminal: what runs now, and how long it took."""

    def __init__(self, stream: TextIO, total: int):
        self.stream, self.total, self.index = stream, total, 0
        self._t0: Optional[float] = None

    def start(self, method: str, what: str) -> None:
        self._t0 = time.perf_counter()
        self.stream.write(f"[{self.index + 1}/{self.total}] {method}: {what} ... ")
        self.stream.flush()

    def done(self, extra: str = "") -> None:
        dt = time.perf_counter() - (self._t0 or time.perf_counter())
        self.stream.write(f"{dt:.0f} s{extra}\n")
        self.stream.flush()


def _run_method(llm_cls, sampling_cls, path: str, extra: dict, prompts_of, progress: Progress,
                name: str, max_tokens: int, enforce_eager: bool) -> dict:
    progress.start(name, "starting the engine")
    llm = llm_cls(model=path, dtype="float32", max_model_len=4096, seed=0,
                  kv_cache_memory_bytes=1 << 30, disable_log_stats=False,
                  enforce_eager=enforce_eager, **extra)
    progress.done()
    prompts = prompts_of(llm.get_tokenizer())
    progress.start(name, f"generating {len(prompts)} prompts x {max_tokens} tokens")
    llm.generate(prompts[:1], sampling_cls(temperature=0.0, max_tokens=8), use_tqdm=False)
    before = _spec_counters(llm)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sampling_cls(temperature=0.0, max_tokens=max_tokens))
    dt = time.perf_counter() - t0
    after = _spec_counters(llm)
    n_tok = sum(len(o.outputs[0].token_ids) for o in outs)
    progress.done(f", {n_tok / dt:.1f} tokens/s")
    progress.index += 1
    drafts = after.get("drafts", 0) - before.get("drafts", 0)
    acc = after.get("accepted_tokens", 0) - before.get("accepted_tokens", 0)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "tps": n_tok / dt, "mal": (1 + acc / drafts) if drafts else None,
              "text": outs[0].outputs[0].text}
    del llm
    gc.collect()
    return result


def _report(runs: dict, model: str, max_tokens: int, k: int, out: TextIO) -> int:
    base, spec = runs["no speculation"], runs["suffix_tree"]
    same = sum(a == b for a, b in zip(base["tokens"], spec["tokens"]))
    out.write("\n=== vllm-spec-plugins demo: suffix-tree proposer vs no speculation ===\n")
    out.write(f"model: {model}   prompts: {len(base['tokens'])} (repetitive edit workload)   "
              f"max_tokens: {max_tokens}   k: {k}   dtype: float32\n")
    out.write(f"{'method':16s} {'tokens/s':>9s} {'mean acceptance length':>23s}\n")
    for name, r in runs.items():
        mal = f"{r['mal']:.2f}" if r["mal"] else "-"
        out.write(f"{name:16s} {r['tps']:9.1f} {mal:>23s}\n")
    out.write(f"speedup: {spec['tps'] / base['tps']:.2f}x\n")
    out.write(f"greedy outputs identical: {'yes' if same == len(base['tokens']) else 'NO'} "
              f"({same}/{len(base['tokens'])})\n")
    out.write("first output:\n" + spec["text"][:400] + "\n")
    out.flush()
    return 0 if same == len(base["tokens"]) else 1


def _tail(path: Path, n: int) -> str:
    try:
        return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-n:])
    except OSError:
        return ""


def run_demo(model: str = "smollm2-135m", max_tokens: int = 160, k: int = 16, *,
             verbose: bool = False, log_file: Optional[str] = None,
             enforce_eager: bool = False) -> int:
    from vllm_spec_plugins.bench.workloads import make_repetitive
    from vllm_spec_plugins.engine_config import speculative_config
    from vllm_spec_plugins.models import resolve_model

    path = resolve_model(model)
    workload = make_repetitive(8, seed=0)

    def prompts_of(tok):
        return [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
                for m in workload.prompts]

    methods = [
        ("no speculation", {}),
        ("suffix_tree", {"speculative_config": speculative_config(k),
                         "additional_config": {"spec_plugins": {"method": "suffix_tree"}}}),
    ]
    log_path = Path(log_file or DEFAULT_LOG_FILE).resolve()
    quiet = contextlib.nullcontext(sys.stdout) if verbose else output_to_file(log_path)
    runs: dict = {}
    try:
        with quiet as terminal:
            if not verbose:
                terminal.write(f"vLLM's logs: {log_path} (--verbose shows them here)\n")
            from vllm import LLM, SamplingParams  # imported here: its import logs go to the file too

            progress = Progress(terminal, len(methods))
            for name, extra in methods:
                runs[name] = _run_method(LLM, SamplingParams, path, extra, prompts_of,
                                         progress, name, max_tokens, enforce_eager)
    except BaseException:
        if not verbose:
            sys.stderr.write(f"\ndemo failed; the last lines of {log_path}:\n"
                             f"{_tail(log_path, LOG_TAIL_LINES)}\n")
        raise
    return _report(runs, model, max_tokens, k, sys.stdout)
