"""vllm_cpu_fixes.py: the work-around for vLLM 0.32's broken CPU expand kernel
(no engine: the kernel is called directly, as the rejection sampler does)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vllm_spec_plugins.integration.vllm_cpu_fixes import expand_kernel_impl  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int32, torch.int64])
def test_expand_kernel_impl_spreads_each_value_over_its_tokens(dtype):
    x = torch.tensor([3, 5, -1, 7], dtype=dtype)
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # request 1 has no draft tokens
    out = torch.full((6,), 99, dtype=dtype)
    expand_kernel_impl(out, x, cu, -1, 1)
    assert out.tolist() == [3, 3, 1, 1, 1, 7]


def test_expand_kernel_impl_keeps_fractional_values():
    out = torch.empty(3, dtype=torch.float32)
    expand_kernel_impl(out, torch.tensor([0.8, 0.25]), torch.tensor([1, 3]), -1, 1)
    assert out.tolist() == pytest.approx([0.8, 0.25, 0.25])


def test_not_applied_on_other_versions(monkeypatch):
    from vllm_spec_plugins.integration import patches, versions

    (fix,) = [p for p in patches.REGISTRATION_PATCHES if p.name == "cpu-expand-kernel"]
    for other in ("0.31.0", "0.33.1"):
        monkeypatch.setattr(versions, "installed_vllm_version", lambda v=other: v)
        assert fix.applies() is False


def test_installed_fix_is_the_kernel_workers_register():
    pytest.importorskip("vllm")
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("the work-around is for vLLM's CPU build")
    from engine_utils import cpu_expand_kernel_broken

    # cpu_expand_kernel_broken loads the general plugins (this package's
    # register() among them, when VLLM_PLUGINS allows it) as a worker does.
    from vllm_spec_plugins.integration.patches import REGISTRATION_PATCHES, apply_patches

    apply_patches(REGISTRATION_PATCHES)
    assert not cpu_expand_kernel_broken()
