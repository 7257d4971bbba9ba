"""Ray deployment recipes: generated configs, committed files, KubeRay manifest
structure, CLI errors (no Ray cluster needed)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from vllm_spec_plugins import deploy
from vllm_spec_plugins.cli import main
from vllm_spec_plugins.registry import resolve

ROOT = pathlib.Path(__file__).resolve().parents[1]


def llm_configs(cfg: dict) -> list[dict]:
    (app,) = cfg["applications"]
    assert app["import_path"] == "vllm_spec_plugins.deploy:build_openai_app"
    return app["args"]["llm_configs"]


def test_committed_recipes_are_what_the_code_generates(tmp_path):
    written = deploy.write_recipes(str(tmp_path))
    assert len(written) == len(deploy.RECIPES) + len(deploy.KUBERAY)
    for path in written:
        rel = pathlib.Path(path).relative_to(tmp_path)
        committed = ROOT / "deploy" / rel
        assert committed.exists(), f"deploy/{rel} missing: run `vllm-spec-plugins deploy recipes`"
        assert committed.read_text() == pathlib.Path(path).read_text(), (
            f"deploy/{rel} is stale: run `vllm-spec-plugins deploy recipes`")


@pytest.mark.parametrize("name", sorted(deploy.RECIPES))
def test_every_recipe_turns_on_its_method(name):
    method, target = deploy.RECIPES[name]
    text = (ROOT / "deploy" / "serve" / f"{name}.yaml").read_text()
    (llm,) = llm_configs(yaml.safe_load(text))
    kw = llm["engine_kwargs"]
    assert kw["speculative_config"] == {"method": "custom_class",
                                        "model": "vllm_spec_plugins.integration.PluginDrafter",
                                        "num_speculative_tokens": 8}
    got_method, _, _ = resolve(kw["additional_config"]["spec_plugins"])
    assert got_method == method
    assert llm["runtime_env"]["env_vars"]["VLLM_PLUGINS"] == "vllm_spec_plugins"
    assert "model" not in kw and "served_model_name" not in kw  # Ray Serve LLM refuses them
    if target == "cpu":
        # Ray Serve LLM switches vLLM to the mp executor for CPU deployments.
        assert llm["accelerator_config"] == {"kind": "cpu"}
        assert "tensor_parallel_size" not in kw and "accelerator_type" not in llm
    else:
        tp = deploy.RECIPE_OVERRIDES.get(name, {}).get("tensor_parallel_size", 2)
        assert kw["tensor_parallel_size"] == tp and llm["accelerator_type"]
        assert "accelerator_config" not in llm
        assert "distributed_executor_backend" not in kw  # Ray's executor on GPUs


@pytest.mark.parametrize("name", sorted(deploy.KUBERAY))
def test_rayservice_manifest_structure(name):
    text = (ROOT / "deploy" / "kuberay" / f"{name}.yaml").read_text()
    m = yaml.safe_load(text)
    assert m["apiVersion"] == "ray.io/v1" and m["kind"] == "RayService"
    assert m["metadata"]["name"]
    spec = m["spec"]
    # serveConfigV2 is the serve recipe's YAML, as text, unchanged.
    recipe = deploy.KUBERAY[name]["recipe"]
    assert isinstance(spec["serveConfigV2"], str)
    assert yaml.safe_load(spec["serveConfigV2"]) == deploy.recipe(recipe)
    cluster = spec["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # replicas never land on the head
    (head_c,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in head_c["ports"]} >= {6379, 8265, 8000}
    (group,) = cluster["workerGroupSpecs"]
    assert group["groupName"] and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    (worker,) = group["template"]["spec"]["containers"]
    for c in (head_c, worker):
        assert c["image"] == deploy.KUBERAY[name]["image"]
        assert {"name": "VLLM_PLUGINS", "value": "vllm_spec_plugins"} in c["env"]
        assert c["resources"]["limits"] == c["resources"]["requests"]
    gpus = deploy.KUBERAY[name].get("worker_gpus", 0)
    assert worker["resources"]["limits"].get("nvidia.com/gpu") == (str(gpus) if gpus else None)
    (llm,) = llm_configs(yaml.safe_load(spec["serveConfigV2"]))
    tp = llm["engine_kwargs"].get("tensor_parallel_size", 1)
    assert gpus in (0, tp) or gpus % tp == 0  # a replica's GPUs fit on one worker


def test_serve_config_validates_settings_and_target():
    cfg = deploy.serve_config("token_recycling", model_id="m", model_source="/m",
                              settings={"topk": 4}, min_replicas=2, max_replicas=3,
                              pip=["vllm-spec-plugins==0.1.0"])
    (llm,) = llm_configs(cfg)
    assert llm["engine_kwargs"]["additional_config"]["spec_plugins"] == {
        "method": "token_recycling", "topk": 4}
    assert llm["deployment_config"]["autoscaling_config"] == {"min_replicas": 2,
                                                              "max_replicas": 3}
    assert llm["runtime_env"]["pip"] == ["vllm-spec-plugins==0.1.0"]
    with pytest.raises(ValueError, match="spec_plugins.topk"):
        deploy.serve_config("token_recycling", model_id="m", model_source="/m",
                            settings={"topk": 0})
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        deploy.serve_config("nope", model_id="m", model_source="/m")
    with pytest.raises(ValueError, match="tensor_parallel_size > 1 needs target 'gpu'"):
        deploy.serve_config("suffix_tree", model_id="m", model_source="/m",
                            tensor_parallel_size=2)
    with pytest.raises(ValueError, match="min_replicas"):
        deploy.serve_config("suffix_tree", model_id="m", model_source="/m", min_replicas=3,
                            max_replicas=2)


def test_serve_config_sharing():
    cfg = deploy.serve_config("suffix_tree", model_id="m", model_source="/m",
                              sharing={"hub": "h", "interval_s": 1.0})
    (llm,) = llm_configs(cfg)
    assert llm["engine_kwargs"]["additional_config"]["spec_plugins_sharing"] == {
        "hub": "h", "interval_s": 1.0}
    (plain,) = llm_configs(deploy.serve_config("suffix_tree", model_id="m", model_source="/m"))
    assert "spec_plugins_sharing" not in plain["engine_kwargs"]["additional_config"]
    with pytest.raises(ValueError, match="spec_plugins_sharing.*interval_s"):
        deploy.serve_config("suffix_tree", model_id="m", model_source="/m",
                            sharing={"interval_s": -1})


def test_cli_serve_and_rayservice_roundtrip(tmp_path, capsys):
    out = tmp_path / "serve.yaml"
    assert main(["deploy", "serve", "--method", "suffix_recycling", "--model", "/models/x",
                 "--model-id", "x", "--replicas", "2", "--max-replicas", "4",
                 "--settings", '{"min_suffix_match": 6}', "-o", str(out)]) == 0
    (llm,) = llm_configs(yaml.safe_load(out.read_text()))
    assert llm["model_loading_config"] == {"model_id": "x", "model_source": "/models/x"}
    assert llm["engine_kwargs"]["additional_config"]["spec_plugins"]["min_suffix_match"] == 6
    manifest = tmp_path / "rs.yaml"
    assert main(["deploy", "rayservice", "--serve-config", str(out), "--image", "img:1",
                 "--worker-gpus", "2", "-o", str(manifest)]) == 0
    m = yaml.safe_load(manifest.read_text())
    assert yaml.safe_load(m["spec"]["serveConfigV2"]) == yaml.safe_load(out.read_text())


@pytest.mark.parametrize("argv, needle", [
    (["deploy", "serve", "--method", "nope", "--model", "/m"], "unknown method 'nope'"),
    (["deploy", "serve", "--method", "suffix_tree", "--model", "/m", "--settings", "{x"],
     "--settings: invalid JSON"),
    (["deploy", "serve", "--method", "suffix_tree", "--model", "/m", "--settings",
      '{"max_tree_dpth": 3}'], "spec_plugins.max_tree_dpth"),
    (["deploy", "rayservice", "--serve-config", "/nonexistent.yaml", "--image", "i"],
     "--serve-config: cannot read /nonexistent.yaml"),
    (["deploy", "serve", "--method", "suffix_tree", "--model", "/m", "--share",
      '{"retry_s": 0}'], "spec_plugins_sharing"),
])
def test_cli_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_rayservice_rejects_a_file_that_is_not_a_serve_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Deployment\n")
    assert main(["deploy", "rayservice", "--serve-config", str(bad), "--image", "i"]) == 2
    assert "has no `applications` list" in capsys.readouterr().err


def test_recipes_validate_against_ray_serve_llm_itself():
    """Ray's own schemas accept every recipe; CPU ones get vLLM's mp executor."""
    llm_mod = pytest.importorskip("ray.serve.llm")
    from ray.serve.schema import ServeDeploySchema

    for name, (_, target) in deploy.RECIPES.items():
        cfg = yaml.safe_load((ROOT / "deploy" / "serve" / f"{name}.yaml").read_text())
        ServeDeploySchema.model_validate(cfg)
        (llm,) = llm_configs(cfg)
        engine = llm_mod.LLMConfig(**llm).get_engine_config()
        backend = engine.get_initialization_kwargs()["distributed_executor_backend"]
        assert backend == ("mp" if target == "cpu" else "ray"), name
