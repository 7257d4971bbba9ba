"""Ray Serve LLM with two CPU replicas sharing what they learn, and failures.

* Both replicas push to and receive from the sharing hub (a named Ray actor).
* A replica killed while requests stream: every request ends (completed or
  an error, never a hang), the other replica keeps serving, Serve replaces
  the dead one.
* The plugin missing where the replicas run: the app builder of the recipes
  fails at once with a message that names the fix, instead of vLLM's
  "Engine core initialization failed" deep in a replica's log.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
import uuid

import pytest

pytest.importorskip("vllm")
pytest.importorskip("ray.serve.llm")
openai = pytest.importorskip("openai")

from ray_utils import SERVE_PORT, http_get, ray_head, serve_env, serve_run  # noqa: E402

from vllm_spec_plugins.deploy import (PLUGIN_ENV, PluginMissingError,  # noqa: E402
                                      build_openai_app, dump_yaml, serve_config)

pytestmark = pytest.mark.engine
NAMESPACE = "vllm-spec-plugins"
HUB = f"serve-hub-{uuid.uuid4().hex[:8]}"
APP = "llm"

# A sitecustomize that makes `vllm_spec_plugins` unimportable in any process
# started with VSP_HIDE_PLUGIN=1: a Ray worker "without the plugin".
HIDE_PLUGIN = '''
import os, sys
if os.environ.get("VSP_HIDE_PLUGIN") == "1":
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name == "vllm_spec_plugins" or name.startswith("vllm_spec_plugins."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None
    sys.meta_path.insert(0, _Hide())
'''


def _replica_states() -> list[str]:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None:
        return []
    # Ray Serve LLM names the engine deployment "LLMServer:<model id>".
    return [str(getattr(s, "value", s)) for name, d in app.deployments.items()
            if name.startswith("LLMServer") for s, n in d.replica_states.items()
            for _ in range(n)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from engine_utils import model_path

    model_dir = model_path()
    tmp = tmp_path_factory.mktemp("serve_replicas")
    env = serve_env()
    with ray_head(env, "--num-cpus", "8"):
        import ray

        ray.init(address="auto", namespace=NAMESPACE, log_to_driver=False)
        try:
            yield {"tmp": tmp, "env": env, "model_dir": model_dir}
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def served(cluster):
    """`serve run` of a two-replica recipe with sharing on."""
    cfg = serve_config("suffix_tree", model_id="smollm2", model_source=cluster["model_dir"],
                       target="cpu", num_speculative_tokens=8, min_replicas=2,
                       max_replicas=2, app_name=APP,
                       sharing={"hub": HUB, "interval_s": 0.5, "retry_s": 1.0},
                       engine_kwargs={"dtype": "float32", "enforce_eager": True,
                                      "max_model_len": 2048,
                                      "kv_cache_memory_bytes": 1 << 30})
    path = cluster["tmp"] / "serve.yaml"
    path.write_text(dump_yaml(cfg))

    def ready() -> bool:
        return ("smollm2" in http_get(f"http://127.0.0.1:{SERVE_PORT}/v1/models")
                and _replica_states().count("RUNNING") == 2)

    with serve_run(path, cluster["tmp"] / "serve.log", cluster["env"], ready, timeout_s=600):
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{SERVE_PORT}/v1", api_key="none",
                            max_retries=0, timeout=300)


TOPICS = ["a lighthouse keeper", "a robot gardener", "a lost kite", "a sleepy dragon",
          "a brave snail", "a city under snow"]


def ask(client, topic: str, max_tokens: int = 48, stream: bool = False):
    messages = [{"role": "user", "content": f"Write a short story about {topic}."}]
    if not stream:
        r = client.chat.completions.create(model="smollm2", messages=messages,
                                           max_tokens=max_tokens, temperature=0)
        return r.choices[0].message.content, r.choices[0].finish_reason
    parts, finish = [], None
    for c in client.chat.completions.create(model="smollm2", messages=messages,
                                            max_tokens=max_tokens, temperature=0,
                                            stream=True):
        if c.choices:
            parts.append(c.choices[0].delta.content or "")
            finish = c.choices[0].finish_reason or finish
    return "".join(parts), finish


def hub_stats() -> dict:
    import ray

    return ray.get(ray.get_actor(HUB, namespace=NAMESPACE).stats.remote())


def wait_for_hub(pred, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        reps = hub_stats()["replicas"]
        if pred(reps) or time.monotonic() > deadline:
            return reps
        time.sleep(1)


def test_both_replicas_push_to_and_receive_from_the_hub(served):
    # Concurrent requests: Serve's router spreads them over both replicas,
    # and each pushes its finished responses (the idle step flushes).
    def round_of(topics):
        with cf.ThreadPoolExecutor(4) as pool:
            for text, finish in pool.map(lambda t: ask(served, t), topics):
                assert text and finish in ("stop", "length")

    # Serve's router may send one round's four requests all to one replica
    # (its queue-length view lags): more rounds, until both have served.
    def rounds_until(pred, topics):
        for attempt in range(4):
            round_of([f"{t} (part {attempt + 1})" for t in topics])
            reps = wait_for_hub(pred, timeout_s=30)
            if pred(reps):
                break
        return reps

    reps = rounds_until(lambda r: sum(v["pushed"] > 0 for v in r.values()) >= 2, TOPICS[:4])
    assert sum(v["pushed"] > 0 for v in reps.values()) >= 2, f"hub saw {reps}"
    # A replica pulls while it runs steps: the next round brings each one the
    # other's responses.
    both = lambda r: sum(v["pushed"] > 0 and v["received"] > 0  # noqa: E731
                         for v in r.values()) >= 2
    reps = rounds_until(both, TOPICS[2:6])
    assert both(reps), f"hub saw {reps}"


def test_replica_killed_mid_request_others_keep_serving(served):
    import ray

    def stream(topic):
        try:
            return ask(served, topic, max_tokens=400, stream=True)
        except Exception as e:  # noqa: BLE001 - the killed replica's requests may fail
            return e

    # Serve names its replica actors "SERVE_REPLICA::<app>#<deployment>#<id>".
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(f"SERVE_REPLICA::{APP}#LLMServer")]
    assert len(replicas) == 2, replicas
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, t) for t in TOPICS[:4]]
        time.sleep(4)  # requests are streaming on both replicas
        victim = ray.get_actor(replicas[0]["name"], namespace=replicas[0]["namespace"])
        ray.kill(victim, no_restart=True)
        outcomes = [f.result(timeout=300) for f in futures]  # none hangs
    done = [o for o in outcomes if isinstance(o, tuple) and o[1] in ("stop", "length")]
    assert done, f"no request finished: {outcomes}"
    # The survivor serves new requests at once...
    text, finish = ask(served, TOPICS[4])
    assert text and finish in ("stop", "length")
    # ...and Serve brings the deployment back to two replicas.
    deadline = time.monotonic() + 420
    while _replica_states().count("RUNNING") < 2:
        assert time.monotonic() < deadline, f"not replaced: {_replica_states()}"
        time.sleep(3)
    text, finish = ask(served, TOPICS[5])
    assert text and finish in ("stop", "length")


def test_plugin_missing_on_the_replicas_fails_at_build_naming_the_fix(cluster, tmp_path):
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(HIDE_PLUGIN)
    cfg = serve_config("suffix_tree", model_id="noplugin", model_source=cluster["model_dir"],
                       target="cpu", app_name="noplugin", route_prefix="/noplugin")
    (llm,) = cfg["applications"][0]["args"]["llm_configs"]
    llm["runtime_env"] = {"env_vars": {**PLUGIN_ENV, "PYTHONPATH": str(hide),
                                       "VSP_HIDE_PLUGIN": "1"}}
    with pytest.raises(PluginMissingError) as e:
        build_openai_app(cfg["applications"][0]["args"])
    msg = str(e.value)
    assert "No module named 'vllm_spec_plugins" in msg
    assert "pip install vllm-spec-plugins" in msg and "runtime_env" in msg
    # With the plugin there, the same check passes.
    llm["runtime_env"] = {"env_vars": dict(PLUGIN_ENV)}
    from vllm_spec_plugins.deploy import check_plugin_importable

    check_plugin_importable(llm["runtime_env"])
