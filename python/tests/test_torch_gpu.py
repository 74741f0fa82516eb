"""The CUDA backend through torch tensors. Skipped, with the reason shown by
`pytest -rs`, where torch, a GPU or a CUDA build of the library is missing
(CI has none of them); run on a GPU machine with torch installed."""
import math

import numpy as np
import pytest

import pagedvl as pv

torch = pytest.importorskip("torch", reason="torch is not installed: the GPU path is not tested")
if not torch.cuda.is_available():
    pytest.skip("torch sees no CUDA device: the GPU path is not tested", allow_module_level=True)
if not pv.backend_available("cuda"):
    pytest.skip("libpagedvl was built without CUDA, or its driver check found no device",
                allow_module_level=True)

GEOM = dict(num_layers=2, num_q_heads=8, num_kv_heads=2, head_dim=64, block_size=16,
            num_blocks=256)


@pytest.fixture
def cache():
    with pv.Cache(backend="cuda", dtype="bf16", device=0, **GEOM) as c:
        yield c


def kv(n, dtype=torch.bfloat16):
    shape = (n, GEOM["num_kv_heads"], GEOM["head_dim"])
    return (torch.randn(shape, device="cuda", dtype=dtype),
            torch.randn(shape, device="cuda", dtype=dtype))


def test_kv_roundtrip_and_checks(cache):
    seq = cache.seq_add(40)
    k, v = kv(40)
    cache.kv_write(seq, 1, 0, k, v)
    k2, v2 = cache.kv_read(seq, 1, 0, 40)
    torch.cuda.synchronize()
    assert k2.dtype == torch.bfloat16 and k2.device == k.device
    assert torch.equal(k2, k) and torch.equal(v2, v)
    with pytest.raises(TypeError, match="must be torch.bfloat16; got torch.float16"):
        cache.kv_write(seq, 1, 0, k.half(), v.half())
    with pytest.raises(ValueError, match="the cache computes on cuda:0, the tensor is on cpu"):
        cache.kv_write(seq, 1, 0, k.cpu(), v.cpu())
    with pytest.raises(TypeError, match="a numpy array is host memory"):
        cache.kv_write(seq, 1, 0, np.zeros((40, 2, 64), np.float32), v)
    with pytest.raises(ValueError, match="must be contiguous"):
        cache.kv_write(seq, 1, 0, k.transpose(0, 1).contiguous().transpose(0, 1), v)
    with pytest.raises(ValueError, match=r"expected shape \(\*, 2, 64\)"):
        cache.kv_write(seq, 1, 0, k.reshape(40, 128), v)


def test_attention_matches_sdpa_on_a_side_stream(cache):
    seqs, ks, vs = [], [], []
    for n in (17, 64, 100):
        s = cache.seq_add(n)
        for layer in range(GEOM["num_layers"]):
            k, v = kv(n)
            cache.kv_write(s, layer, 0, k, v)
            if layer == 0:
                ks.append(k)
                vs.append(v)
        seqs.append(s)
    stream = torch.cuda.Stream()
    torch.cuda.current_stream().synchronize()
    with cache.plan(4) as plan, torch.cuda.stream(stream):
        cache.seq_append(seqs)  # the current (side) stream by default
        plan.build(seqs)
        k_new, v_new = kv(3)
        plan.kv_write(0, k_new, v_new)
        q = torch.randn(3, GEOM["num_q_heads"], GEOM["head_dim"], device="cuda",
                        dtype=torch.bfloat16)
        out = plan.attention_decode(0, q)
    stream.synchronize()
    group = GEOM["num_q_heads"] // GEOM["num_kv_heads"]
    for b in range(3):
        kk = torch.cat([ks[b], k_new[b:b + 1]]).float().repeat_interleave(group, dim=1)
        vv = torch.cat([vs[b], v_new[b:b + 1]]).float().repeat_interleave(group, dim=1)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q[b].float().unsqueeze(1), kk.transpose(0, 1), vv.transpose(0, 1)).squeeze(1)
        rel = ((out[b].float() - ref).norm() / ref.norm()).item()
        assert rel < 2e-2, (b, rel)


def test_observe_and_compress_report(cache):
    m = 300
    seq = cache.seq_add(m, visual=[(5, 250)])
    for layer in range(GEOM["num_layers"]):
        k, v = kv(m)
        cache.kv_write(seq, layer, 0, k, v)
    pol = pv.Policy.vlcache(keep=0.2)
    rows = cache.policy_rows(pol, seq)
    assert rows == (250, 50, False)
    for layer in range(GEOM["num_layers"]):
        q = torch.randn(rows.n, GEOM["num_q_heads"], GEOM["head_dim"], device="cuda",
                        dtype=torch.bfloat16)
        cache.observe(seq, layer, q, rows.first, pol)
    before = cache.stats()
    rep = cache.compress(seq, pol)
    torch.cuda.synchronize()
    after = cache.stats()
    assert rep.blocks_before - rep.blocks_after == before.used_blocks - after.used_blocks
    assert rep.kept_total == int(rep.kept.sum())
    assert math.isclose(rep.keep_ratio, rep.kept_total / (GEOM["num_layers"] * m))
