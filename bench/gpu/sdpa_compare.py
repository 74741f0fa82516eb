#!/usr/bin/env python3
"""libpagedvl against PyTorch on the same tokens, through ctypes.

1. Decode attention: pvl_attention_decode over a paged cache vs
   torch.nn.functional.scaled_dot_product_attention over a dense contiguous
   cache of the same tokens (bf16, 8 KV heads, 32 query heads, head_dim 128).
   Checks the outputs agree, then times both with CUDA events.
2. Compression cost: pvl_observe over every layer + pvl_compress for one
   request, as a fraction of the prefill attention (causal SDPA over the same
   prompt, every layer).

Usage: python3 bench/gpu/sdpa_compare.py build/libpagedvl.so
Needs a CUDA build of the library, a GPU and PyTorch. Not run by ctest.
"""
import ctypes as C
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PVL_BACKEND_CUDA, PVL_DTYPE_BF16 = 1, 2
PVL_POLICY_VLCACHE = 5


class Config(C.Structure):
    _fields_ = [("size", C.c_size_t), ("backend", C.c_int), ("device", C.c_int32),
                ("dtype", C.c_int), ("num_layers", C.c_uint32),
                ("num_q_heads", C.c_uint32), ("num_kv_heads", C.c_uint32),
                ("head_dim", C.c_uint32), ("block_size", C.c_uint32),
                ("num_blocks", C.c_uint32), ("memory_fraction", C.c_float),
                ("max_seqs", C.c_uint32), ("allocator", C.c_void_p)]


class Policy(C.Structure):
    _fields_ = [("size", C.c_size_t), ("kind", C.c_int), ("keep_ratio", C.c_float),
                ("threshold", C.c_float), ("min_layer_ratio", C.c_float),
                ("recent_ratio", C.c_float), ("window_cap", C.c_uint32),
                ("fallback_window", C.c_uint32), ("renormalize", C.c_uint32),
                ("sink_tokens", C.c_uint32), ("snap_window", C.c_uint32),
                ("pool_kernel", C.c_uint32), ("pyramid_beta", C.c_float),
                ("decode_cap", C.c_uint32), ("decode_cap_slack", C.c_uint32)]


class Span(C.Structure):
    _fields_ = [("begin", C.c_uint32), ("end", C.c_uint32)]


lib = C.CDLL(sys.argv[1] if len(sys.argv) > 1 else "build/libpagedvl.so")
lib.pvl_status_string.restype = C.c_char_p
lib.pvl_cache_last_error.restype = C.c_char_p
lib.pvl_create_last_error.restype = C.c_char_p
lib.pvl_attention_decode.argtypes = [C.c_void_p, C.c_uint32, C.c_void_p,
                                     C.c_void_p, C.c_float, C.c_void_p]
lib.pvl_observe.argtypes = [C.c_void_p, C.c_uint64, C.c_uint32, C.c_void_p,
                            C.c_uint32, C.c_uint32, C.c_float, C.c_float,
                            C.c_void_p]
lib.pvl_kv_write.argtypes = [C.c_void_p, C.c_uint64, C.c_uint32, C.c_uint32,
                             C.c_uint32, C.c_void_p, C.c_void_p, C.c_void_p]
lib.pvl_plan_kv_write.argtypes = [C.c_void_p, C.c_uint32, C.c_void_p,
                                  C.c_void_p, C.c_void_p]
lib.pvl_seq_free.argtypes = [C.c_void_p, C.c_uint64]
lib.pvl_compress.argtypes = [C.c_void_p, C.c_uint64, C.c_void_p, C.c_void_p,
                             C.c_void_p]


def check(st, cache=None):
    if st != 0:
        msg = lib.pvl_cache_last_error(cache) if cache else lib.pvl_create_last_error()
        raise RuntimeError(f"{lib.pvl_status_string(st).decode()}: {msg.decode()}")


def make_cache(layers, blocks, hq=32, hkv=8, d=128, bs=16):
    cfg = Config()
    check(lib.pvl_config_init(C.byref(cfg)))
    cfg.backend, cfg.dtype = PVL_BACKEND_CUDA, PVL_DTYPE_BF16
    cfg.num_layers, cfg.num_q_heads, cfg.num_kv_heads = layers, hq, hkv
    cfg.head_dim, cfg.block_size, cfg.num_blocks = d, bs, blocks
    cache = C.c_void_p()
    check(lib.pvl_cache_create(C.byref(cfg), C.byref(cache)))
    return cache


def cuda_time(fn, reps=20, warm=5):
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def decode_case(batch, ctx, hq=32, hkv=8, d=128, bs=16):
    cache = make_cache(1, batch * (ctx // bs + 3) + 16, hq, hkv, d, bs)
    k = torch.randn(batch, ctx + 1, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.full_like(q, float("nan"))
    seqs = (C.c_uint64 * batch)()
    for b in range(batch):
        sid = C.c_uint64()
        check(lib.pvl_seq_add(cache, C.c_uint32(ctx), None, C.c_uint32(0), C.byref(sid)), cache)
        seqs[b] = sid.value
        check(lib.pvl_kv_write(cache, sid.value, 0, 0, ctx, k[b, :ctx].data_ptr(),
                               v[b, :ctx].data_ptr(), None), cache)
    check(lib.pvl_seq_append(cache, seqs, C.c_uint32(batch), None), cache)
    plan = C.c_void_p()
    check(lib.pvl_plan_create(cache, C.c_uint32(batch), C.c_uint64(0), C.byref(plan)), cache)
    check(lib.pvl_plan_build(plan, seqs, C.c_uint32(batch), None), cache)
    knew, vnew = k[:, ctx].contiguous(), v[:, ctx].contiguous()
    check(lib.pvl_plan_kv_write(plan, 0, knew.data_ptr(), vnew.data_ptr(), None), cache)

    def ours():
        check(lib.pvl_attention_decode(plan, 0, q.data_ptr(), out.data_ptr(), 0.0, None), cache)

    kd = k.transpose(1, 2).contiguous()  # [B, Hkv, T, d]: the dense cache
    vd = v.transpose(1, 2).contiguous()
    qd = q.unsqueeze(2)                  # [B, Hq, 1, d]

    def sdpa():
        return F.scaled_dot_product_attention(qd, kd, vd, enable_gqa=True)

    ours()
    torch.cuda.synchronize()
    ref = sdpa().squeeze(2).float()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    t_ours, t_sdpa = cuda_time(ours), cuda_time(sdpa)
    lib.pvl_plan_destroy(plan)
    lib.pvl_cache_destroy(cache)
    return rel, t_ours, t_sdpa


def compress_case(m=2940, visual=(5, 2885), layers=32, hq=32, hkv=8, d=128):
    cache = make_cache(layers, layers * (m // 16 + 3) + 16, hq, hkv, d)
    span = Span(*visual)
    sid = C.c_uint64()
    check(lib.pvl_seq_add(cache, C.c_uint32(m), C.byref(span), C.c_uint32(1), C.byref(sid)), cache)
    k = torch.randn(layers, m, hkv, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    qfull = torch.randn(layers, m, hq, d, device="cuda", dtype=torch.bfloat16)
    for l in range(layers):
        check(lib.pvl_kv_write(cache, sid.value, l, 0, m, k[l].data_ptr(), v[l].data_ptr(), None), cache)
    pol = Policy()
    check(lib.pvl_policy_init(C.byref(pol), PVL_POLICY_VLCACHE))
    first, n, fb = C.c_uint32(), C.c_uint32(), C.c_uint32()
    check(lib.pvl_policy_rows(C.byref(pol), cache, C.c_uint64(sid.value), C.byref(first),
                              C.byref(n), C.byref(fb)), cache)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for l in range(layers):
        qw = qfull[l, first.value:].contiguous()
        check(lib.pvl_observe(cache, sid.value, l, qw.data_ptr(), first.value, n.value,
                              pol.threshold, 0.0, None), cache)
    check(lib.pvl_compress(cache, sid.value, C.byref(pol), None, None), cache)
    torch.cuda.synchronize()
    t_ours = (time.perf_counter() - t0) * 1e6
    qd = qfull.transpose(1, 2)  # [L, Hq, m, d]
    kd = k.transpose(1, 2)
    vd = v.transpose(1, 2)

    def prefill():
        for l in range(layers):
            F.scaled_dot_product_attention(qd[l:l + 1], kd[l:l + 1], vd[l:l + 1],
                                           is_causal=True, enable_gqa=True)

    t_prefill = cuda_time(prefill, reps=5, warm=2)
    lib.pvl_cache_destroy(cache)
    return t_ours, t_prefill, n.value


def main():
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("batch,context,rel_err,pvl_us,sdpa_us,speedup")
    for batch, ctx in [(1, 4096), (8, 4096), (64, 4096), (1, 32768), (16, 16384)]:
        rel, a, b = decode_case(batch, ctx)
        print(f"{batch},{ctx},{rel:.2e},{a:.1f},{b:.1f},{b / a:.2f}", flush=True)
    t_ours, t_prefill, rows = compress_case()
    print("observe_compress_us,prefill_sdpa_us,window_rows,fraction")
    print(f"{t_ours:.0f},{t_prefill:.0f},{rows},{t_ours / t_prefill:.3f}")


if __name__ == "__main__":
    main()
