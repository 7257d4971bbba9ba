"""CPU runtime preload (Intel OpenMP, tcmalloc): library discovery, LD_PRELOAD
composition, the VSP_CPU_PRELOAD switch, the re-exec guard, bench --cpu-preload
and the Ray recipes' env var. No engine: fake library trees and fake workers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vllm_spec_plugins import cpu_runtime as C
from vllm_spec_plugins import deploy
from vllm_spec_plugins.bench import runner as R
from vllm_spec_plugins.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def fake_tree(tmp_path: Path, iomp: bool = True, tcmalloc: bool = True) -> tuple[Path, Path]:
    """<tmp>/venv/lib (pip's place) and <tmp>/system (a system lib dir)."""
    venv_lib, system = tmp_path / "venv" / "lib", tmp_path / "system"
    venv_lib.mkdir(parents=True)
    system.mkdir()
    (venv_lib / "libiompstubs5.so").write_bytes(b"")  # a neighbour, not the runtime
    if iomp:
        (venv_lib / "libiomp5.so").write_bytes(b"")
    if tcmalloc:
        (system / "libtcmalloc_minimal.so.4").write_bytes(b"")
    return venv_lib, system


def libs_of(tmp_path: Path, **kw) -> C.CpuRuntimeLibs:
    venv_lib, system = fake_tree(tmp_path, **kw)
    return C.find_libraries([venv_lib, system], ldconfig_text="", use_distributions=False)


# ------------------------------------------------------------------ discovery
def test_finds_both_libraries_in_a_fake_tree(tmp_path):
    libs = libs_of(tmp_path)
    assert libs.iomp == str(tmp_path / "venv/lib/libiomp5.so")
    assert libs.tcmalloc == str(tmp_path / "system/libtcmalloc_minimal.so.4")
    assert libs.paths() == [libs.tcmalloc, libs.iomp]  # tcmalloc first, as vLLM's guide has it
    assert libs.missing() == []


def test_missing_libraries_are_none_and_named(tmp_path):
    libs = libs_of(tmp_path, iomp=False, tcmalloc=False)
    assert libs == C.CpuRuntimeLibs(None, None)
    assert libs.paths() == [] and libs.missing() == ["libiomp5.so", "libtcmalloc"]
    lines = C.missing_lines(libs)
    assert "pip install intel-openmp" in lines[0] and "libtcmalloc-minimal4" in lines[1]


def test_tcmalloc_found_through_the_ldconfig_cache(tmp_path):
    real = tmp_path / "elsewhere" / "libtcmalloc_minimal.so.4"
    real.parent.mkdir()
    real.write_bytes(b"")
    ld = ("2 libs found in cache `/etc/ld.so.cache'\n"
          f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {real}\n"
          "\tlibgomp.so.1 (libc6,x86-64) => /nowhere/libgomp.so.1\n")
    assert C.parse_ldconfig(ld)["libtcmalloc_minimal.so.4"] == str(real)
    libs = C.find_libraries([tmp_path / "empty"], ldconfig_text=ld, use_distributions=False)
    assert libs.tcmalloc == str(real) and libs.iomp is None
    # a cache entry whose file is gone does not count
    real.unlink()
    assert C.find_libraries([tmp_path], ldconfig_text=ld, use_distributions=False).tcmalloc is None


# ------------------------------------------------------------------ LD_PRELOAD
def test_compose_keeps_existing_entries_and_adds_no_duplicates():
    libs = ["/v/lib/libtcmalloc_minimal.so.4", "/v/lib/libiomp5.so"]
    assert C.compose_preload(None, libs) == "/v/lib/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so"
    assert C.compose_preload("/a/libfoo.so", libs) == \
        "/a/libfoo.so:/v/lib/libtcmalloc_minimal.so.4:/v/lib/libiomp5.so"
    # already there (same path), and spaces as separators, and a duplicate of the user's own
    assert C.compose_preload("/v/lib/libiomp5.so /a/libfoo.so:/a/libfoo.so", libs) == \
        "/v/lib/libiomp5.so:/a/libfoo.so:/v/lib/libtcmalloc_minimal.so.4"
    # another libiomp / libtcmalloc of the user's stays, ours is not added next to it
    assert C.compose_preload("/opt/intel/libiomp5.so:/usr/lib/libtcmalloc.so.4", libs) == \
        "/opt/intel/libiomp5.so:/usr/lib/libtcmalloc.so.4"
    assert C.strip_preload("/a/libfoo.so:/v/lib/libiomp5.so /x/libtcmalloc.so.4") == "/a/libfoo.so"


def test_switch_values_and_default(monkeypatch):
    assert C.switch_value({}) == C.DEFAULT_SWITCH == "0"
    assert C.switch_value({C.SWITCH_ENV: " "}) == C.DEFAULT_SWITCH
    for v in ("auto", "1", "0", "AUTO"):
        assert C.switch_value({C.SWITCH_ENV: v}) == v.lower()
    with pytest.raises(ValueError, match=r"VSP_CPU_PRELOAD='yes please': expected auto"):
        C.switch_value({C.SWITCH_ENV: "yes please"})


def test_switch_off_leaves_the_environment_unchanged(tmp_path):
    libs = libs_of(tmp_path)
    env = {"LD_PRELOAD": "/a/libfoo.so", "X": "1"}
    assert C.preload_environ({**env, C.SWITCH_ENV: "0"}, libs=libs) == {**env, C.SWITCH_ENV: "0"}
    assert C.preload_environ(env, libs=libs) == env  # unset = the default (off)
    # auto: only with the CPU build of vLLM
    auto = {**env, C.SWITCH_ENV: "auto"}
    assert C.preload_environ(auto, libs=libs, cpu_build=False) == auto
    got = C.preload_environ(auto, libs=libs, cpu_build=True)
    assert got["LD_PRELOAD"] == "/a/libfoo.so:" + ":".join(libs.paths())
    # 1: on, and says what is missing
    half = libs_of(tmp_path / "half", tcmalloc=False)
    got = C.preload_environ({C.SWITCH_ENV: "1"}, libs=half, cpu_build=False)
    assert got["LD_PRELOAD"] == half.iomp


def test_without_preload_keeps_an_empty_value():
    env = C.without_preload({"LD_PRELOAD": "/v/libiomp5.so:/v/libtcmalloc_minimal.so.4"})
    assert env["LD_PRELOAD"] == ""  # so merging over os.environ cannot bring them back
    assert "LD_PRELOAD" not in C.without_preload({})


# ------------------------------------------------------------------ re-exec
MAPS = ("7f00-7f01 r-xp 00000000 08:01 1 {lib}\n"
        "7f02-7f03 r--p 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
        "7f04-7f05 rw-p 00000000 00:00 0 \n")


def test_reexec_plan_guard_and_loaded_check(tmp_path):
    libs = libs_of(tmp_path)
    on = {C.SWITCH_ENV: "1", "LD_PRELOAD": "/a/libfoo.so"}
    plan = C.reexec_plan(on, libs, cpu_build=False, maps_text=MAPS.format(lib="/a/libfoo.so"))
    assert plan is not None and plan[C.REEXEC_MARKER_ENV] == "1"
    assert plan["LD_PRELOAD"] == "/a/libfoo.so:" + ":".join(libs.paths())
    # the re-exec'd process carries the marker: never again, even if nothing got loaded
    assert C.reexec_plan(plan, libs, cpu_build=False, maps_text="") is None
    # already loaded (the shell set LD_PRELOAD): nothing to do
    maps = MAPS.format(lib=libs.iomp) + MAPS.format(lib=libs.tcmalloc)
    assert C.reexec_plan(on, libs, cpu_build=False, maps_text=maps) is None
    # switch off / auto without the CPU build / nothing found: nothing to do
    assert C.reexec_plan({C.SWITCH_ENV: "0"}, libs, cpu_build=True, maps_text="") is None
    assert C.reexec_plan({C.SWITCH_ENV: "auto"}, libs, cpu_build=False, maps_text="") is None
    none = C.CpuRuntimeLibs()
    assert C.reexec_plan({C.SWITCH_ENV: "1"}, none, cpu_build=True, maps_text="") is None


def test_mapped_runtime_libs_reads_the_maps():
    maps = MAPS.format(lib="/v/lib/libiomp5.so") + MAPS.format(lib="/v/lib/libiomp5.so")
    assert C.mapped_runtime_libs(maps) == ["/v/lib/libiomp5.so"]
    assert C.loaded_in_this_process(["/v/lib/libiomp5.so"], maps)
    assert not C.loaded_in_this_process(["/v/lib/libiomp5.so", "/v/libtcmalloc.so.4"], maps)


def test_reexec_happens_once_even_when_the_loader_ignores_the_library(tmp_path):
    """A real exec: the fake libiomp5.so is no ELF file, so the loader ignores it
    and the restarted process still lacks it; the marker must stop a second restart."""
    venv_lib, _ = fake_tree(tmp_path, tcmalloc=False)
    starts = tmp_path / "starts.txt"
    script = tmp_path / "cmd.py"
    script.write_text(textwrap.dedent(f"""
        import os, sys
        from vllm_spec_plugins import cpu_runtime as C
        with open({str(starts)!r}, "a") as f:
            f.write(os.environ.get("LD_PRELOAD", "-") + "\\n")
        C.find_libraries = lambda: C.CpuRuntimeLibs(iomp={str(venv_lib / 'libiomp5.so')!r})
        C.reexec_with_preload()
        print("ran", sys.argv[1:])
    """))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", C.REEXEC_MARKER_ENV)}
    env.update({C.SWITCH_ENV: "1", "PYTHONPATH": str(ROOT)})
    res = subprocess.run([sys.executable, str(script), "a", "b"], env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ran ['a', 'b']"  # same arguments after the restart
    assert starts.read_text().splitlines() == ["-", str(venv_lib / "libiomp5.so")]
    assert "tcmalloc" in res.stderr  # switch 1 names what is missing, once
    assert res.stderr.count("libtcmalloc not found") == 1


def test_cpu_env_prints_an_export_line(monkeypatch, capsys, tmp_path):
    libs = libs_of(tmp_path)
    monkeypatch.setattr(C, "find_libraries", lambda: libs)
    monkeypatch.delenv(C.SWITCH_ENV, raising=False)
    monkeypatch.setenv("LD_PRELOAD", "/a/libfoo.so")
    assert main(["cpu-env"]) == 0
    assert capsys.readouterr().out.strip() == \
        "export LD_PRELOAD=/a/libfoo.so:" + ":".join(libs.paths())
    monkeypatch.setenv(C.SWITCH_ENV, "0")
    assert main(["cpu-env"]) == 0
    out = capsys.readouterr().out
    assert "export" not in out and out.startswith("#")
    monkeypatch.delenv(C.SWITCH_ENV)
    monkeypatch.setattr(C, "find_libraries", lambda: C.CpuRuntimeLibs())
    assert main(["cpu-env"]) == 0
    out = capsys.readouterr().out
    assert "export" not in out and "pip install intel-openmp" in out


# ------------------------------------------------------------------ bench
def bench_cfg(*extra):
    args = build_parser().parse_args(["bench", "--methods", "none,suffix_tree", *extra])
    return R.config_from_args(args, registry={"suffix_tree": True}, known_workloads=["repetitive"],
                              has_arctic=False)


def test_bench_cpu_preload_parsing():
    with pytest.raises(ValueError, match=r"--cpu-preload: expected one of auto, on, off, both, "
                                         r"got 'sometimes'"):
        bench_cfg("--workloads", "repetitive", "--cpu-preload", "sometimes")
    cfg = bench_cfg("--workloads", "repetitive")
    assert cfg.cpu_preload == "auto" and [m.cpu_preload for m in cfg.methods] == [None, None]
    cfg = bench_cfg("--workloads", "repetitive", "--cpu-preload", "BOTH")
    assert [(m.label, m.cpu_preload) for m in cfg.methods] == [
        ("none", False), ("none+preload", True), ("suffix_tree", False),
        ("suffix_tree+preload", True)]
    assert cfg.methods[3].plugin_method == "suffix_tree"
    cfg = bench_cfg("--workloads", "repetitive", "--cpu-preload", "off")
    assert [(m.label, m.cpu_preload) for m in cfg.methods] == [("none", False), ("suffix_tree", False)]


def test_bench_cpu_preload_plan(tmp_path):
    libs = libs_of(tmp_path)
    both = bench_cfg("--workloads", "repetitive", "--cpu-preload", "both")
    plan = R.plan_cpu_preload(both, libs, environ={})
    assert plan.libraries == libs.paths()
    assert plan.by_label == {"none": False, "none+preload": True, "suffix_tree": False,
                             "suffix_tree+preload": True}
    with pytest.raises(ValueError, match=r"--cpu-preload both: neither libiomp5.so nor libtcmalloc"):
        R.plan_cpu_preload(both, C.CpuRuntimeLibs(), environ={})
    # off needs no library
    off = bench_cfg("--workloads", "repetitive", "--cpu-preload", "off")
    assert set(R.plan_cpu_preload(off, C.CpuRuntimeLibs(), environ={}).by_label.values()) == {False}
    # auto follows the switch: off by default, environment as it is
    auto = bench_cfg("--workloads", "repetitive")
    assert set(R.plan_cpu_preload(auto, libs, environ={}, cpu_build=True).by_label.values()) == {None}
    plan = R.plan_cpu_preload(auto, libs, environ={C.SWITCH_ENV: "auto"}, cpu_build=True)
    assert set(plan.by_label.values()) == {True} and "VSP_CPU_PRELOAD=auto" in plan.description


def test_bench_worker_environ():
    libs = ["/v/libtcmalloc_minimal.so.4", "/v/libiomp5.so"]
    base = {"LD_PRELOAD": "/a/libfoo.so:/old/libiomp5.so", "PATH": "/bin"}
    on = R.worker_environ(True, libs, base)
    assert on["LD_PRELOAD"] == "/a/libfoo.so:" + ":".join(libs)  # the user's other libiomp replaced
    assert on["VLLM_PLUGINS"] == "vllm_spec_plugins" and on["PATH"] == "/bin"
    assert R.worker_environ(False, libs, base)["LD_PRELOAD"] == "/a/libfoo.so"
    assert R.worker_environ(None, libs, base)["LD_PRELOAD"] == base["LD_PRELOAD"]


# ------------------------------------------------------------------ deploy
def test_deploy_env_var_only_when_present(tmp_path):
    libs = libs_of(tmp_path)
    assert deploy.cpu_preload_env_vars({C.SWITCH_ENV: "1"}, libs) == {"LD_PRELOAD": ":".join(libs.paths())}
    assert deploy.cpu_preload_env_vars({C.SWITCH_ENV: "1"}, C.CpuRuntimeLibs()) == {}
    assert deploy.cpu_preload_env_vars({}, libs) == {}  # default: off
    kw = dict(model_id="m", model_source="/models/m")
    (llm,) = deploy.serve_config("suffix_tree", ld_preload="/x/libiomp5.so", **kw)[
        "applications"][0]["args"]["llm_configs"]
    assert llm["runtime_env"]["env_vars"] == {"VLLM_PLUGINS": "vllm_spec_plugins",
                                              "LD_PRELOAD": "/x/libiomp5.so"}
    (llm,) = deploy.serve_config("suffix_tree", **kw)["applications"][0]["args"]["llm_configs"]
    assert "LD_PRELOAD" not in llm["runtime_env"]["env_vars"]
    with pytest.raises(ValueError, match="ld_preload: .*target 'cpu'"):
        deploy.serve_config("suffix_tree", target="gpu", ld_preload="/x/libiomp5.so", **kw)


@pytest.mark.parametrize("found", [True, False])
def test_deploy_serve_cli_adds_what_is_found(found, tmp_path, monkeypatch, capsys):
    libs = libs_of(tmp_path, iomp=found, tcmalloc=found)
    monkeypatch.setattr(C, "find_libraries", lambda: libs)
    monkeypatch.setenv(C.SWITCH_ENV, "auto")
    out = tmp_path / "serve.yaml"
    assert main(["deploy", "serve", "--method", "suffix_tree", "--model", str(tmp_path),
                 "-o", str(out)]) == 0
    (llm,) = yaml.safe_load(out.read_text())["applications"][0]["args"]["llm_configs"]
    env = llm["runtime_env"]["env_vars"]
    if found:
        assert env["LD_PRELOAD"] == ":".join(libs.paths())
        assert "the nodes need the same paths" in capsys.readouterr().err
    else:
        assert "LD_PRELOAD" not in env
    # explicit: an empty --ld-preload turns it off
    assert main(["deploy", "serve", "--method", "suffix_tree", "--model", str(tmp_path),
                 "--ld-preload", "", "-o", str(out)]) == 0
    (llm,) = yaml.safe_load(out.read_text())["applications"][0]["args"]["llm_configs"]
    assert "LD_PRELOAD" not in llm["runtime_env"]["env_vars"]


def _run(label, repeat, tps_by_cell, status="ok"):
    return {"label": label, "repeat": repeat, "status": status,
            "measurements": [{"workload": w, "scenario": s, "wall_s": 2.0, "output_tokens": 2 * t}
                             for (w, s), t in tps_by_cell.items()]}


def test_preload_pairs_within_a_repeat():
    from vllm_spec_plugins.bench.report import preload_pairs, preload_table

    cell = ("code", "batch 1")
    runs = [_run("none", 0, {cell: 10.0}), _run("none+preload", 0, {cell: 12.0}),
            _run("none", 1, {cell: 20.0}), _run("none+preload", 1, {cell: 21.0}),
            _run("suffix_tree", 0, {cell: 30.0}), _run("suffix_tree+preload", 0, {cell: 15.0}),
            _run("suffix_tree", 1, {cell: 30.0}), _run("suffix_tree+preload", 1, {}, "failed"),
            _run("ngram", 0, {cell: 5.0})]  # no preloaded twin: not in the table
    pairs = preload_pairs(runs)
    assert [(p["method"], p["pairs"]) for p in pairs] == [("none", 2), ("suffix_tree", 1)]
    none = pairs[0]
    # paired per repeat: 1.2 and 1.05, not the ratio of the medians (16.5 / 15)
    assert none["ratio"] == pytest.approx(1.125)
    assert (none["ratio_min"], none["ratio_max"]) == (pytest.approx(1.05), pytest.approx(1.2))
    assert none["tokens_per_s"] == 15.0 and none["tokens_per_s_preload"] == 16.5
    assert pairs[1]["ratio"] == 0.5 and pairs[1]["tokens_per_s"] == 30.0
    table = preload_table(runs)
    assert "| none " in table and "1.12x (1.05–1.20)" in table and "0.50x" in table
    assert "ngram" not in table


# --------------------------------------------------------------------------- default dtype

AMD_AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse sse2 avx avx2 fma\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_default_cpu_dtype_bf16_only_where_the_cpu_computes_it():
    dtype, why = C.default_cpu_dtype(AMD_AVX2)
    assert dtype == "float32" and "no native bfloat16" in why and "avx512_bf16" in why
    dtype, why = C.default_cpu_dtype(SAPPHIRE)
    assert dtype == "bfloat16" and "avx512_bf16, amx_bf16" in why
    assert C.default_cpu_dtype("")[0] == "bfloat16"  # flags unknown: vLLM's usual
    assert C.cpu_flags(AMD_AVX2) == {"fpu", "sse", "sse2", "avx", "avx2", "fma"}
