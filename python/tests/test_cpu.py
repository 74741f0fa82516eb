"""The package on the CPU backend with numpy: every wrapper, the errors it
raises (statuses and messages from the library, Python checks of dtype,
shape and layout before any pointer is passed), attention against a numpy
reference, and a compression report that adds up."""
import math

import numpy as np
import pytest

import pagedvl as pv
from conftest import GEOM, attention_ref


def kv(rng, n, dtype=np.float32, geom=GEOM):
    shape = (n, geom["num_kv_heads"], geom["head_dim"])
    return (rng.standard_normal(shape).astype(dtype),
            rng.standard_normal(shape).astype(dtype))


def q_rows(rng, n, dtype=np.float32, geom=GEOM):
    return rng.standard_normal((n, geom["num_q_heads"], geom["head_dim"])).astype(dtype)


def prefill(cache, rng, n, visual=()):
    seq = cache.seq_add(n, visual=visual)
    data = []
    for layer in range(cache.config.num_layers):
        k, v = kv(rng, n)
        cache.kv_write(seq, layer, 0, k, v)
        data.append((k, v))
    return seq, data


# ---- module, enums, config ------------------------------------------------


def test_version_status_and_dtype_helpers():
    assert pv.__version__.count(".") == 2
    assert pv.status_string(pv.Status.OUT_OF_BLOCKS).startswith("PVL_ERR_OUT_OF_BLOCKS")
    assert pv.status_string(999).startswith("PVL_ERR_?")
    assert [pv.dtype_size(d) for d in ("f32", "f16", "bf16")] == [4, 2, 2]
    assert pv.dtype_size(pv.DType.F16) == 2
    assert pv.backend_available("cpu") is True
    assert pv.backend_available(pv.Backend.AUTO) is True


def test_config_roundtrip_and_defaults(make_cache):
    c = make_cache(dtype=pv.DType.F16, max_seqs=7)
    cfg = c.config
    assert cfg.backend is pv.Backend.CPU and cfg.dtype is pv.DType.F16
    assert (cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads, cfg.head_dim,
            cfg.block_size, cfg.num_blocks, cfg.max_seqs) == (3, 4, 2, 8, 4, 96, 7)
    assert cfg.memory_fraction == pytest.approx(0.9)  # pvl_config_init default
    # AUTO on a machine (or build) without CUDA resolves to the CPU; dtype
    # names of numpy are accepted.
    if not pv.backend_available("cuda"):
        assert make_cache(backend="auto", dtype=np.float32).config.backend is pv.Backend.CPU
    assert "cpu f32 L=3" in repr(make_cache())


def test_config_errors():
    with pytest.raises(TypeError, match="unknown config field 'num_heads'"):
        pv.Cache(num_heads=3)
    with pytest.raises(TypeError, match="allocator"):
        pv.Cache(allocator=None)
    with pytest.raises(ValueError, match="backend: unknown name 'tpu'"):
        pv.Cache(backend="tpu")
    with pytest.raises(ValueError, match="num_layers: must be in"):
        pv.Cache(num_layers=-1)
    with pytest.raises(TypeError, match="head_dim: expected an integer"):
        pv.Cache(head_dim=8.0)
    # The library's own check: geometry left at zero.
    with pytest.raises(pv.PagedVLError) as e:
        pv.Cache(backend="cpu")
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    assert "pvl_cache_create" in e.value.message
    assert str(e.value).startswith("PVL_ERR_INVALID_ARGUMENT: pvl_cache_create")


def test_cuda_backend_without_a_device_is_an_error_not_a_crash():
    if pv.backend_available("cuda"):
        pytest.skip("a CUDA device is usable here: covered by test_torch_gpu.py")
    with pytest.raises(pv.PagedVLError) as e:
        pv.Cache(backend="cuda", dtype="f16", **GEOM)
    assert e.value.status in (pv.Status.UNSUPPORTED, pv.Status.NO_DEVICE)


def test_close_and_context_manager(make_cache):
    c = make_cache()
    p = c.plan(2)
    with c:
        seq = c.seq_add(5)
    assert c.closed and p.closed
    c.close()  # idempotent
    p.close()  # destroyed with the cache: no double free
    with pytest.raises(ValueError, match="the cache is closed"):
        c.seq_free(seq)
    with pytest.raises(ValueError, match="cache is closed"):
        p.info()
    with pv.Cache(backend="cpu", dtype="f32", **GEOM) as c2:
        with c2.plan(1) as p2:
            assert not p2.closed
        assert p2.closed and not c2.closed


# ---- sequences --------------------------------------------------------------


def test_sequence_lifecycle(cache, rng):
    bs, L = GEOM["block_size"], GEOM["num_layers"]
    seq, _ = prefill(cache, rng, 10, visual=[(2, 8)])
    info = cache.seq_info(seq)
    assert (info.n_prompt, info.n_decoded, info.position, info.n_visual_spans) == (10, 0, 10, 1)
    assert info.total_tokens == 10 * L and info.total_blocks == math.ceil(10 / bs) * L
    assert cache.seq_visual_spans(seq) == [(2, 8)]
    assert cache.seq_layer_size(seq, 1) == (10, 3)
    blocks = cache.seq_blocks(seq, 0)
    assert blocks.dtype == np.int32 and len(set(blocks.tolist())) == 3
    np.testing.assert_array_equal(cache.seq_positions(seq, 2), np.arange(10))
    st = cache.stats()
    assert (st.used_blocks, st.free_blocks, st.num_seqs, st.tokens) == (9, 87, 1, 30)
    assert st.block_bytes == 2 * 2 * 4 * 8 * 4 and st.pool_bytes == 96 * st.block_bytes
    np.testing.assert_array_equal(cache.layer_tokens(), [10, 10, 10])

    child = cache.seq_fork(seq)
    assert child != seq and cache.stats().shared_blocks == 9
    # Both append: the shared partial last block is copied for each.
    assert cache.blocks_for_append([seq, child]) == 2 * L
    cache.seq_append([seq, child])
    assert cache.seq_info(child).n_decoded == 1 and cache.seq_info(seq).position == 11
    cache.seq_append(seq)  # a single id works too
    assert cache.seq_info(seq).n_decoded == 2

    cache.seq_free(child)
    cache.seq_retain(seq, 1, [0, 5, 9, 11])
    assert cache.seq_layer_size(seq, 1) == (4, 1)
    np.testing.assert_array_equal(cache.seq_positions(seq, 1), [0, 5, 9, 11])
    cache.seq_free(seq)
    st = cache.stats()
    assert (st.used_blocks, st.free_blocks, st.num_seqs, st.tokens) == (0, 96, 0, 0)


def test_sequence_errors_carry_status_and_message(cache):
    seq = cache.seq_add(4)
    cache.seq_free(seq)
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_free(seq)
    assert e.value.status is pv.Status.UNKNOWN_SEQUENCE
    assert "pvl_seq_free" in e.value.message and cache.last_error == e.value.message
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_add(0)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_add(10, visual=[(8, 12)])  # span past the prompt
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(ValueError, match=r"expected \(begin, end\) pairs"):
        cache.seq_add(10, visual=[(1, 2, 3)])
    s = cache.seq_add(4)
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_append([s, s])
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="seqs: values must be in"):
        cache.seq_append([-1])
    with pytest.raises(TypeError, match="seq: expected an integer"):
        cache.seq_info("1")
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_retain(s, 0, [2, 1])  # not ascending
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_layer_size(s, 3)  # the cache has layers 0..2
    assert e.value.status is pv.Status.INVALID_ARGUMENT


def test_admission_queries_and_out_of_blocks(make_cache):
    c = make_cache(num_blocks=12)  # 3 layers: 4 blocks per layer
    assert c.blocks_for_prompt(9) == 3 * 3
    assert c.can_add(16) is pv.Admit.OK
    assert c.can_add(17) is pv.Admit.NEVER
    s = c.seq_add(9)
    assert c.can_add(5) is pv.Admit.LATER
    before = c.stats()
    with pytest.raises(pv.PagedVLError) as e:
        c.seq_add(5)
    assert e.value.status is pv.Status.OUT_OF_BLOCKS
    assert c.stats() == before  # nothing was reserved
    with pytest.raises(pv.PagedVLError) as e:
        c.blocks_for_prompt(0)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    c.seq_free(s)
    assert c.can_add(5) is pv.Admit.OK


def test_max_seqs_is_capacity(make_cache):
    c = make_cache(max_seqs=2)
    c.seq_add(1)
    c.seq_add(1)
    with pytest.raises(pv.PagedVLError) as e:
        c.seq_add(1)
    assert e.value.status is pv.Status.CAPACITY


# ---- K/V data ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_kv_roundtrip(make_cache, rng, dtype):
    c = make_cache(dtype=dtype)
    np_dtype = pv.numpy_dtype(c.config.dtype)
    seq = c.seq_add(7)
    k, v = kv(rng, 7)
    if dtype == "bf16":  # bit patterns: the upper halves of float32
        k = (k.view(np.uint32) >> 16).astype(np.uint16)
        v = (v.view(np.uint32) >> 16).astype(np.uint16)
        if pv.BF16_NUMPY is not None:
            k = k.view(pv.BF16_NUMPY)
    else:
        k, v = k.astype(np_dtype), v.astype(np_dtype)
    c.kv_write(seq, 2, 0, k, v)
    k2, v2 = c.kv_read(seq, 2, 0, 7)
    assert k2.dtype == np_dtype and k2.shape == (7, 2, 8)
    np.testing.assert_array_equal(k2.view(np.uint16) if dtype != "f32" else k2,
                                  k.view(np.uint16) if dtype != "f32" else k)
    np.testing.assert_array_equal(v2.view(np.uint16) if dtype != "f32" else v2,
                                  v.view(np.uint16) if dtype != "f32" else v)
    # Reading into given arrays, a sub-range.
    out_k, out_v = np.zeros((3, 2, 8), np_dtype), np.zeros((3, 2, 8), np_dtype)
    rk, rv = c.kv_read(seq, 2, 4, 3, out_k, out_v)
    assert rk is out_k and rv is out_v
    np.testing.assert_array_equal(out_k.view(np.uint8), k2[4:7].view(np.uint8))


def test_bad_data_raises_with_expected_and_actual(cache, rng):
    seq = cache.seq_add(6)
    k, v = kv(rng, 6)
    with pytest.raises(TypeError, match=r"k: the cache dtype is f32, so the array must be "
                                        r"float32; got float64"):
        cache.kv_write(seq, 0, 0, k.astype(np.float64), v)
    with pytest.raises(ValueError, match=r"k: expected shape \(\*, 2, 8\) "
                                         r"\[n\]\[num_kv_heads\]\[head_dim\], got \(6, 16\)"):
        cache.kv_write(seq, 0, 0, k.reshape(6, 16), v)
    with pytest.raises(ValueError, match=r"v: expected shape \(6, 2, 8\).*got \(5, 2, 8\)"):
        cache.kv_write(seq, 0, 0, k, v[:5])
    with pytest.raises(ValueError, match="k: must be C-contiguous"):
        cache.kv_write(seq, 0, 0, np.asfortranarray(k), v)
    with pytest.raises(TypeError, match="k: expected a numpy array, got list"):
        cache.kv_write(seq, 0, 0, k.tolist(), v)
    ro = np.zeros((6, 2, 8), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="k: the output array is read-only"):
        cache.kv_read(seq, 0, 0, 6, ro, ro.copy())
    with pytest.raises(ValueError, match=r"k: expected shape \(4, 2, 8\)"):
        cache.kv_read(seq, 0, 0, 4, np.zeros((6, 2, 8), np.float32))

    class DeviceArray:  # device memory must not reach a CPU cache
        __cuda_array_interface__ = {"shape": (6, 2, 8), "typestr": "<f4",
                                    "data": (1 << 40, False), "version": 3}

    with pytest.raises(TypeError, match="device memory"):
        cache.kv_write(seq, 0, 0, DeviceArray(), v)
    # Ranges the library checks: slots past the sequence's end.
    with pytest.raises(pv.PagedVLError) as e:
        cache.kv_write(seq, 0, 3, k, v)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    assert "pvl_kv_write" in e.value.message


def test_cpu_dlpack_producer_is_read_through_numpy(cache, rng):
    seq = cache.seq_add(6)
    k, v = kv(rng, 6)

    class Producer:  # a CPU DLPack producer that is not a numpy array
        def __init__(self, a):
            self.a = a

        def __dlpack__(self, **kw):
            return self.a.__dlpack__(**kw)

        def __dlpack_device__(self):
            return self.a.__dlpack_device__()

    cache.kv_write(seq, 1, 0, Producer(k), Producer(v))
    k2, _ = cache.kv_read(seq, 1, 0, 6)
    np.testing.assert_array_equal(k2, k)


# ---- plans and attention -------------------------------------------------------


def test_decode_attention_matches_numpy(cache, rng):
    seqs, data = [], []
    for n in (5, 9, 13):
        s, d = prefill(cache, rng, n)
        seqs.append(s)
        data.append(d)
    with cache.plan(4) as plan:
        cache.seq_append(seqs)
        plan.build(seqs)
        info = plan.info()
        assert (info.n_seqs, info.max_seqs) == (3, 4) and info.last_update_bytes > 0
        for layer in range(GEOM["num_layers"]):
            k_new, v_new = kv(rng, 3)
            plan.kv_write(layer, k_new, v_new)
            q = q_rows(rng, 3)
            out = plan.attention_decode(layer, q)
            scaled = plan.attention_decode(layer, q, np.empty_like(q), scale=0.5)
            for b in range(3):
                k_all = np.concatenate([data[b][layer][0], k_new[b:b + 1]])
                v_all = np.concatenate([data[b][layer][1], v_new[b:b + 1]])
                np.testing.assert_allclose(out[b], attention_ref(q[b], k_all, v_all),
                                           rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(scaled[b], attention_ref(q[b], k_all, v_all, 0.5),
                                           rtol=1e-5, atol=1e-5)
                # kv_write went into the slot the append made
                k_read, _ = cache.kv_read(seqs[b], layer, k_all.shape[0] - 1, 1)
                np.testing.assert_array_equal(k_read[0], k_new[b])


def test_f16_attention_close_to_reference(make_cache, rng):
    c = make_cache(dtype="f16")
    s = c.seq_add(11)
    k, v = kv(rng, 12, np.float16)
    c.kv_write(s, 0, 0, k[:11], v[:11])
    plan = c.plan(1)
    c.seq_append(s)
    plan.build([s])
    plan.kv_write(0, k[11:], v[11:])
    q = q_rows(rng, 1, np.float16)
    out = plan.attention_decode(0, q)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out[0].astype(np.float64), attention_ref(q[0], k, v),
                               rtol=2e-2, atol=2e-3)


def test_plan_errors(cache, rng):
    s, _ = prefill(cache, rng, 6)
    plan = cache.plan(2)
    cache.seq_append(s)
    plan.build([s])
    with pytest.raises(ValueError, match=r"q: expected shape \(1, 4, 8\) "
                                         r"\[n_seqs\]\[num_q_heads\]\[head_dim\], got \(2, 4, 8\)"):
        plan.attention_decode(0, q_rows(rng, 2))
    with pytest.raises(ValueError, match=r"out: expected shape \(1, 4, 8\)"):
        plan.attention_decode(0, q_rows(rng, 1), np.empty((1, 4, 7), np.float32))
    cache.seq_append(s)  # the plan is now stale
    with pytest.raises(pv.PagedVLError) as e:
        plan.attention_decode(0, q_rows(rng, 1))
    assert e.value.status is pv.Status.BAD_STATE
    with pytest.raises(pv.PagedVLError) as e:
        cache.plan(0)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(pv.PagedVLError) as e:
        plan.build([s, s, s])  # more than max_seqs
    assert e.value.status is pv.Status.CAPACITY
    with pytest.raises(pv.PagedVLError) as e:
        plan.build([s, s])  # a sequence appears once
    assert e.value.status is pv.Status.INVALID_ARGUMENT


# ---- policies ------------------------------------------------------------------


def test_policy_objects():
    p = pv.Policy.vlcache(keep=0.2, window_cap=16)
    assert p.kind is pv.PolicyKind.VLCACHE and p.name == "vlcache"
    assert p.keep_ratio == 0.2 and p.keep == 0.2 and p.window_cap == 16
    assert (p.threshold, p.min_layer_ratio, p.recent_ratio) == (0.01, 0.01, 0.1)
    assert pv.Policy.full().keep_ratio == 1.0
    for name in ("full", "streaming", "h2o", "snapkv", "pyramidkv", "vlcache"):
        q = getattr(pv.Policy, name)()
        assert q.name == name and pv.policy_parse(name) is q.kind
        assert pv.policy_name(q.kind) == name and pv.Policy(name) == q
    assert pv.Policy.streaming().sink_tokens == 4 and pv.Policy.snapkv().snap_window == 32
    p.renormalize = True
    assert p.renormalize == 1 and "renormalize=1" in repr(p)
    with pytest.raises(AttributeError, match="no field 'keep_fraction'"):
        p.keep_fraction = 0.5
    with pytest.raises(ValueError, match="window_cap: must be in"):
        p.window_cap = -1
    with pytest.raises(TypeError, match="threshold: expected a number"):
        p.threshold = "0.1"
    with pytest.raises(pv.PagedVLError) as e:
        pv.policy_parse("lru")
    assert e.value.status is pv.Status.INVALID_ARGUMENT and "lru" in e.value.message


def vlcache_budgets(density, alpha, m, lo=0.01):
    """Algorithm 1 of the paper, as the header states it."""
    L = len(density)
    z = sum(density)
    out = []
    for d in density:
        beta = alpha if z == 0 else min(max(d / z * alpha * L, lo), 1.0)
        out.append(max(1, math.floor(beta * m + 0.5)))
    return out


def test_policy_functions():
    h2o = pv.Policy.h2o(keep=0.25)
    np.testing.assert_array_equal(pv.policy_budgets(h2o, 3, 40), [10, 10, 10])
    vl = pv.Policy.vlcache(keep=0.2)
    dens = [0.9, 0.5, 0.1, 0.02]
    b = pv.policy_budgets(vl, 4, 100, dens)
    assert b.dtype == np.uint32
    np.testing.assert_array_equal(b, vlcache_budgets(dens, 0.2, 100))
    with pytest.raises(ValueError, match=r"density: expected shape \(4,\)"):
        pv.policy_budgets(vl, 4, 100, dens[:3])
    with pytest.raises(pv.PagedVLError) as e:
        pv.policy_budgets(pv.Policy.vlcache(keep=1.5), 4, 100, dens)
    assert e.value.status is pv.Status.INVALID_ARGUMENT and "keep_ratio" in e.value.message

    raw = np.array([4.0, 1.0, 3.0, 2.0, 0.5], np.float32)
    seen = np.array([4, 1, 2, 2, 1], np.uint32)
    np.testing.assert_allclose(pv.policy_scores(h2o, raw, seen, 4), raw / seen)
    with pytest.raises(ValueError, match=r"seen: expected shape \(5,\)"):
        pv.policy_scores(h2o, raw, seen[:4], 4)

    np.testing.assert_array_equal(pv.policy_select(pv.Policy.full(), 10, m=10), np.arange(10))
    st = pv.policy_select(pv.Policy.streaming(sink_tokens=2), 5, m=20)
    np.testing.assert_array_equal(st, [0, 1, 17, 18, 19])
    top = pv.policy_select(pv.Policy.h2o(recent_ratio=0.0), 2, scores=[5, 1, 9, 0, 3])
    np.testing.assert_array_equal(top, [0, 2])
    with pytest.raises(TypeError, match="give scores, or m"):
        pv.policy_select(h2o, 3)
    with pytest.raises(pv.PagedVLError) as e:  # full refuses a smaller budget
        pv.policy_select(pv.Policy.full(), 3, m=10)
    assert e.value.status is pv.Status.INVALID_ARGUMENT


# ---- observation and compression ----------------------------------------------------


@pytest.mark.parametrize("kind", ["vlcache", "h2o", "snapkv", "pyramidkv", "streaming", "full"])
def test_compress_report_adds_up(make_cache, rng, kind):
    c = make_cache(num_blocks=200)
    m, L = 40, GEOM["num_layers"]
    other = c.seq_add(5)  # a bystander: compression must not touch it
    seq, data = prefill(c, rng, m, visual=[(3, 30)])
    pol = pv.Policy(kind, keep_ratio=1.0 if kind == "full" else 0.25, snap_window=8)
    rows = pv.policy_rows(pol, c, seq)
    assert rows == c.policy_rows(pol, seq)
    if kind == "vlcache":
        assert rows == pv.Rows(30, 10, False)  # the post-vision window
    for layer in range(L):
        if rows.n:
            c.observe(seq, layer, q_rows(rng, rows.n), rows.first, pol)
    if rows.n:
        obs = c.seq_observation(seq, 0)
        assert obs.n_rows == rows.n and obs.n_keys == m
        assert obs.gamma.shape == (4,) and 0.0 <= obs.gamma_layer <= 1.0
        assert obs.raw.shape == (m,) and obs.seen.dtype == np.uint32
    before, other_info = c.stats(), c.seq_info(other)
    rep = c.compress(seq, pol)
    after = c.stats()
    assert rep.n_prompt == m and (rep.window_first, rep.window_rows) == (rows.first, rows.n)
    assert rep.budget.shape == rep.kept.shape == rep.density.shape == (L,)
    np.testing.assert_array_equal(rep.kept, np.minimum(rep.budget, m))
    assert rep.kept_total == int(rep.kept.sum())
    assert rep.keep_ratio == pytest.approx(rep.kept_total / (L * m))
    # The sequence's saving is the pool's net change (no fork shares blocks).
    assert rep.blocks_before - rep.blocks_after == before.used_blocks - after.used_blocks
    assert after.free_blocks - before.free_blocks == rep.blocks_freed - rep.blocks_taken
    info = c.seq_info(seq)
    assert info.total_tokens == rep.kept_total and info.total_blocks == rep.blocks_after
    assert c.seq_info(other) == other_info
    for layer in range(L):
        pos = c.seq_positions(seq, layer)
        assert len(pos) == rep.kept[layer] and np.all(np.diff(pos.astype(np.int64)) > 0)
        # kept tokens keep their data
        k, _ = c.kv_read(seq, layer, 0, len(pos))
        np.testing.assert_array_equal(k, data[layer][0][pos])
    if kind == "full":
        assert rep.kept_total == L * m and rep.blocks_after == rep.blocks_before
    else:
        assert rep.blocks_after < rep.blocks_before
    with pytest.raises(pv.PagedVLError) as e:  # a sequence is compressed once
        c.compress(seq, pol)
    assert e.value.status is pv.Status.BAD_STATE


def test_compress_needs_observation(cache, rng):
    seq, _ = prefill(cache, rng, 20, visual=[(2, 15)])
    with pytest.raises(pv.PagedVLError) as e:
        cache.seq_observation(seq, 0)
    assert e.value.status is pv.Status.BAD_STATE
    before = cache.stats()
    with pytest.raises(pv.PagedVLError) as e:
        cache.compress(seq, pv.Policy.vlcache())
    assert e.value.status is pv.Status.BAD_STATE and "pvl_compress" in e.value.message
    assert cache.stats() == before
    with pytest.raises(ValueError, match=r"q: expected shape \(\*, 4, 8\)"):
        cache.observe(seq, 0, np.zeros((3, 2, 8), np.float32), 17)
    with pytest.raises(TypeError, match="policy: expected a pagedvl.Policy"):
        cache.compress(seq, "vlcache")


def test_decode_cap(make_cache, rng):
    c = make_cache(num_layers=1, num_blocks=64)
    pol = pv.Policy.h2o(decode_cap=10, decode_cap_slack=2)
    small, _ = prefill(c, rng, 8)
    assert c.decode_cap(small, 0, pol) is False  # within the cap
    seq, _ = prefill(c, rng, 12)
    with pytest.raises(pv.PagedVLError) as e:  # over the cap, nothing observed
        c.decode_cap(seq, 0, pol)
    assert e.value.status is pv.Status.BAD_STATE
    c.observe(seq, 0, q_rows(rng, 4), 8, pol)
    assert c.decode_cap(seq, 0, pol) is True
    assert c.seq_layer_size(seq, 0)[0] == 8  # decode_cap - slack
    assert c.decode_cap(seq, 0, pol) is False
    with pytest.raises(pv.PagedVLError) as e:  # decode_cap = 0: off
        c.decode_cap(seq, 0, pv.Policy.h2o())
    assert e.value.status is pv.Status.INVALID_ARGUMENT


def test_streams_are_ignored_on_the_cpu(cache, rng):
    # The CPU backend finishes before returning and ignores the stream, so
    # any stream value is accepted and passed as NULL.
    s = cache.seq_add(4)
    k, v = kv(rng, 4)
    cache.kv_write(s, 0, 0, k, v, stream=12345)
    cache.seq_append(s, stream=object())
    np.testing.assert_array_equal(cache.kv_read(s, 0, 0, 4, stream=7)[0], k)
