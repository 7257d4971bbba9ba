"""The masked-block drafter's model and runtime (torch, no vLLM): the cached,
batched inference pass computes exactly what the training formulation does,
caches follow the context (divergence, eviction), and bad drafter
directories fail naming what is wrong."""

import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from vllm_spec_plugins.proposers import block_drafter as bd  # noqa: E402


@pytest.fixture(scope="module")
def drafter_dir(untrained_drafter_cache, tmp_path_factory):
    """The untrained drafter with a perturbed mask embedding (so masks differ
    from the mean embedding and the block really depends on them)."""
    out = tmp_path_factory.mktemp("perturbed") / "d"
    spec, module = bd.load_drafter(str(untrained_drafter_cache / "smollm2-135m"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.mask_embed.add_(0.1 * torch.randn(module.mask_embed.shape, generator=g))
    bd.save_drafter(str(out), spec, module)
    return str(out)


def reference(rt, seq):
    """The block after ``seq`` computed as in training: no cache, one pass."""
    K = rt.block_size
    w = torch.from_numpy(np.asarray(seq, dtype=np.int64)).unsqueeze(0)
    ids, is_mask, pos, mask, _ = bd.train_inputs(w, [len(seq)], torch.tensor([[len(seq) - 1]]), K)
    with torch.no_grad():
        h, _ = rt.module.run(rt.module.embed_inputs(ids, is_mask), pos, mask)
        p = torch.softmax(rt.module.logits(h[0, len(seq):]).float(), -1)
    tp, ti = p.topk(rt.top_m, -1)
    return rt.draft_vocab[ti].numpy(), tp.numpy()


def test_cached_batched_pass_equals_the_training_formulation(drafter_dir):
    rt = bd.BlockDrafterRuntime(drafter_dir, top_m=4)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 8000, 70), rng.integers(0, 8000, 50)
    sa, sb = rt.new_state(), rt.new_state()
    # contexts grow by different amounts per step (accepted drafts + bonus)
    for na, nb in [(20, 5), (23, 6), (31, 30), (32, 50), (70, 50)]:
        ids, probs = rt.draft([sa, sb], [a[:na], b[:nb]])
        for r, seq in ((0, a[:na]), (1, b[:nb])):
            ref_ids, ref_p = reference(rt, seq)
            assert np.array_equal(ids[r, :, 0], ref_ids[:, 0])
            np.testing.assert_allclose(probs[r], ref_p, atol=1e-4)
    # the cache holds the context less its last token
    assert len(sa.tokens) == 69 and len(sb.tokens) == 49
    assert rt.stats["cached_tokens"] == 69 + 49


def test_a_context_that_diverges_from_the_cache_is_read_again(drafter_dir):
    rt = bd.BlockDrafterRuntime(drafter_dir, top_m=4)
    rng = np.random.default_rng(1)
    seq = rng.integers(0, 8000, 60)
    st = rt.new_state()
    rt.draft([st], [seq])
    other = seq.copy()
    other[40] = (other[40] + 1) % 8000  # e.g. a preempted request recomputed differently
    ids, probs = rt.draft([st], [other[:55]])
    ref_ids, ref_p = reference(rt, other[:55])
    np.testing.assert_allclose(probs[0], ref_p, atol=1e-4)
    assert st.tokens.tolist() == other[:54].tolist()


def test_caches_stay_under_their_bound(drafter_dir):
    rt = bd.BlockDrafterRuntime(drafter_dir, top_m=2, max_cached_tokens=300)
    rng = np.random.default_rng(2)
    states = [rt.new_state() for _ in range(4)]
    seqs = [rng.integers(0, 8000, 120) for _ in states]
    for st, s in zip(states, seqs):
        rt.draft([st], [s])
        assert rt.stats["cached_tokens"] <= 300 + 119  # at most one row over, while it drafts
    assert rt.stats["evictions"] >= 2
    # an evicted request still drafts (it reads its window again)
    ids, probs = rt.draft([states[0]], [seqs[0]])
    np.testing.assert_allclose(probs[0], reference(rt, seqs[0])[1], atol=1e-4)
    for st in states:
        rt.release(st)
    assert rt.stats["cached_tokens"] == 0


def test_window_bounds_the_context_read(drafter_dir):
    rt = bd.BlockDrafterRuntime(drafter_dir, top_m=2, max_context=64)
    seq = np.random.default_rng(3).integers(0, 8000, 300)
    st = rt.new_state()
    rt.draft([st], [seq[:200]])
    assert st.offset == 200 - 64 and len(st.tokens) == 63
    rt.draft([st], [seq[:250]])  # grows up to twice the window before sliding
    assert st.offset == 136
    rt.draft([st], [seq[:300]])
    assert st.offset == 300 - 64


def test_bad_drafter_directories_fail_naming_the_problem(drafter_dir, tmp_path):
    with pytest.raises(bd.DrafterFormatError, match="not a drafter directory.*train-drafter"):
        bd.read_spec(str(tmp_path / "nothing"))
    broken = tmp_path / "broken"
    shutil.copytree(drafter_dir, broken)
    (broken / bd.SPEC_FILE).write_text("{not json")
    with pytest.raises(bd.DrafterFormatError, match="unreadable drafter spec"):
        bd.read_spec(str(broken))
    trunc = tmp_path / "trunc"
    shutil.copytree(drafter_dir, trunc)
    data = (trunc / bd.WEIGHTS_FILE).read_bytes()
    (trunc / bd.WEIGHTS_FILE).write_bytes(data[: len(data) // 3])
    with pytest.raises(bd.DrafterFormatError, match="unreadable drafter.safetensors"):
        bd.load_drafter(str(trunc))
    other = tmp_path / "other_format"
    shutil.copytree(drafter_dir, other)
    spec = json.loads((other / bd.SPEC_FILE).read_text())
    spec["format"] = "something-else/9"
    (other / bd.SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(bd.DrafterFormatError, match="format 'something-else/9'"):
        bd.read_spec(str(other))


def test_block_loss_weighs_the_block_start():
    logits = torch.zeros(1, 1, 3, 4)
    logits[0, 0, 0, 1] = 5.0  # position 0 right, positions 1-2 uniform
    targets = torch.tensor([[[1, 2, -1]]])
    uniform = bd.weighted_block_loss(logits, targets, decay=0)
    start = bd.weighted_block_loss(logits, targets, decay=1.0)
    ce0 = float(torch.nn.functional.cross_entropy(logits[0, 0, :1], torch.tensor([1])))
    ce1 = float(np.log(4))
    assert float(uniform) == pytest.approx((ce0 + ce1) / 2, rel=1e-5)
    w1 = float(np.exp(-1.0))
    assert float(start) == pytest.approx((ce0 + w1 * ce1) / (1 + w1), rel=1e-5)


def test_a_shorter_block_equals_training_on_a_shorter_block(drafter_dir):
    """Inference may run fewer block positions than trained (adaptive
    length); training shows the drafter such blocks (``block_lens``)."""
    rt = bd.BlockDrafterRuntime(drafter_dir, top_m=3)
    seq = np.random.default_rng(4).integers(0, 8000, 40)
    st = rt.new_state()
    ids, probs = rt.draft([st], [seq], block=4)
    assert ids.shape == (1, 4, 3)
    K = rt.block_size
    w = torch.from_numpy(seq).unsqueeze(0)
    x_ids, is_mask, pos, mask, targets = bd.train_inputs(
        w, [40], torch.tensor([[39]]), K, block_lens=np.array([[4]]))
    with torch.no_grad():
        h, _ = rt.module.run(rt.module.embed_inputs(x_ids, is_mask), pos, mask)
        p = torch.softmax(rt.module.logits(h[0, 40:44]).float(), -1)
    np.testing.assert_allclose(probs[0], p.topk(3, -1).values.numpy(), atol=1e-4)
    assert (targets[0, 4:] == -1).all()  # nothing to learn past the short block
