"""Several ranks through the in-process communicator: each rank's collective
calls come from its own Python thread (ctypes releases the GIL during the
call), and a model split over ranks compresses to the same budgets as one
cache holding every layer."""
import threading

import numpy as np
import pytest

import pagedvl as pv

HQ, HKV, D, BS, LG = 4, 2, 8, 4, 4


def run_ranks(n, fn):
    comms = pv.Comm.local(n)
    results, errors = [None] * n, []

    def body(r):
        try:
            results[r] = fn(comms[r], r)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a collective did not complete"
    for c in comms:
        c.close()
    if errors:
        raise errors[0]
    return results


def test_comm_handles_and_split_range():
    comms = pv.Comm.local(3)
    assert [(c.rank, c.size) for c in comms] == [(0, 3), (1, 3), (2, 3)]
    assert "rank 1 of 3" in repr(comms[1])
    for c in comms:
        c.close()
        c.close()  # idempotent
    with pytest.raises(ValueError, match="the comm is closed"):
        comms[0].rank
    assert [pv.split_range(10, 3, r) for r in range(3)] == [(0, 3), (3, 3), (6, 4)]
    with pytest.raises(pv.PagedVLError) as e:
        pv.split_range(10, 0, 0)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(ValueError, match="nranks: must be in"):
        pv.Comm.local(-1)
    with pytest.raises(pv.PagedVLError) as e:
        pv.Comm.local(0)
    assert e.value.status is pv.Status.INVALID_ARGUMENT
    with pytest.raises(TypeError, match="comm: expected a pagedvl.Comm"):
        pv.Cache(comm=1)


def prompt_data(m, seed=7):
    g = np.random.default_rng(seed)
    k = g.standard_normal((LG, m, HKV, D), np.float32)
    v = g.standard_normal((LG, m, HKV, D), np.float32)
    # later layers attend sharply to a few keys, so densities differ by layer
    q = g.standard_normal((LG, m, HQ, D), np.float32)
    for layer in range(LG):
        q[layer] *= 1 + 3 * layer
    return k, v, q


def compress_one(cache, layers, m, k, v, q, pol):
    seq = cache.seq_add(m, visual=[(2, 30)])
    rows = cache.policy_rows(pol, seq)
    for local, layer in enumerate(layers):
        cache.kv_write(seq, local, 0, k[layer], v[layer])
        cache.observe(seq, local, q[layer, rows.first:rows.first + rows.n], rows.first, pol)
    return cache.compress(seq, pol)


def test_layer_split_compresses_like_one_cache():
    m = 40
    k, v, q = prompt_data(m)
    pol = pv.Policy.vlcache(keep=0.3)
    with pv.Cache(backend="cpu", dtype="f32", num_layers=LG, num_q_heads=HQ,
                  num_kv_heads=HKV, head_dim=D, block_size=BS, num_blocks=128) as one:
        ref = compress_one(one, range(LG), m, k, v, q, pol)

    def rank(comm, r):
        with pv.Cache(backend="cpu", dtype="f32", comm=comm, split="layers",
                      model_num_layers=LG, num_layers=0, num_q_heads=HQ,
                      num_kv_heads=HKV, head_dim=D, block_size=BS, num_blocks=64) as c:
            cfg = c.config
            assert cfg.split is pv.Split.LAYERS and cfg.model_num_layers == LG
            assert (cfg.layer_begin, cfg.num_layers) == pv.split_range(LG, comm.size, r)
            assert c.comm is comm
            with pytest.raises(ValueError, match="open cache"):
                comm.close()  # the cache still uses it
            layers = range(cfg.layer_begin, cfg.layer_begin + cfg.num_layers)
            return cfg.layer_begin, compress_one(c, layers, m, k, v, q, pol)

    out = run_ranks(2, rank)
    budgets = np.concatenate([rep.budget for _, rep in sorted(out, key=lambda x: x[0])])
    assert len(set(ref.budget.tolist())) > 1  # per-layer budgets differ
    np.testing.assert_array_equal(budgets, ref.budget)
    assert sum(rep.kept_total for _, rep in out) == ref.kept_total


def test_run_ranks_drives_every_rank_from_one_thread():
    assert pv.run_ranks(3, lambda r: r * r) == [0, 1, 4]
    with pytest.raises(ZeroDivisionError):
        pv.run_ranks(2, lambda r: 1 // (r - 1))  # rank 1 divides by zero
    comms = pv.Comm.local(2)
    # Creation is collective: both ranks must be inside the call at once,
    # which run_ranks arranges (rank 0 on this thread).
    caches = pv.run_ranks(2, lambda r: pv.Cache(
        backend="cpu", dtype="f32", comm=comms[r], split="heads", model_num_kv_heads=HKV,
        num_kv_heads=0, num_q_heads=HQ, num_layers=2, head_dim=D, block_size=BS,
        num_blocks=32))
    assert [c.config.kv_head_begin for c in caches] == [0, 1]
    assert [c.config.num_kv_heads for c in caches] == [1, 1]
    seqs = pv.run_ranks(2, lambda r: caches[r].seq_add(9))
    assert seqs[0] == seqs[1]  # ranks admit together and agree on ids
    with pytest.raises(pv.PagedVLError) as e:  # ranks disagree: every rank fails
        pv.run_ranks(2, lambda r: caches[r].seq_add(9 + r))
    assert e.value.status is pv.Status.BAD_STATE
    for c in caches:
        c.close()
    for c in comms:
        c.close()


def test_a_failing_rank_fails_every_rank():
    def rank(comm, r):
        try:
            pv.Cache(backend="cpu", dtype="f32", comm=comm, split="layers",
                     model_num_layers=LG, num_layers=0, num_q_heads=HQ,
                     num_kv_heads=HKV, head_dim=D if r == 0 else 0, block_size=BS,
                     num_blocks=64)
        except pv.PagedVLError as e:
            return e.status
        return None

    statuses = run_ranks(2, rank)
    assert statuses == [pv.Status.INVALID_ARGUMENT] * 2
