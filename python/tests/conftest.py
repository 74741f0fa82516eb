"""Shared fixtures: small CPU caches and a dense numpy reference."""
import numpy as np
import pytest

import pagedvl as pv

GEOM = dict(num_layers=3, num_q_heads=4, num_kv_heads=2, head_dim=8,
            block_size=4, num_blocks=96)


@pytest.fixture
def make_cache():
    made = []

    def make(**kw):
        cfg = dict(GEOM, backend="cpu", dtype="f32")
        cfg.update(kw)
        c = pv.Cache(**cfg)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def cache(make_cache):
    return make_cache()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def attention_ref(q, k, v, scale=None):
    """Dense decode attention in float64: q [Hq][D], k/v [T][Hkv][D]."""
    hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    scale = 1.0 / np.sqrt(d) if not scale else scale
    out = np.zeros((hq, d))
    for h in range(hq):
        kh = k[:, h // group, :].astype(np.float64)
        vh = v[:, h // group, :].astype(np.float64)
        s = kh @ q[h].astype(np.float64) * scale
        p = np.exp(s - s.max())
        out[h] = (p / p.sum()) @ vh
    return out
