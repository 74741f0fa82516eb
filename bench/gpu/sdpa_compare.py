#!/usr/bin/env python3
"""libpagedvl against PyTorch on the same tokens, through the pagedvl package.

1. Decode attention: Plan.attention_decode over a paged cache vs
   torch.nn.functional.scaled_dot_product_attention over a dense contiguous
   cache of the same tokens (bf16, 8 KV heads, 32 query heads, head_dim 128).
   Checks the outputs agree, then times both with CUDA events.
2. Compression cost: Cache.observe over every layer + Cache.compress for one
   request, as a fraction of the prefill attention (causal SDPA over the same
   prompt, every layer).

Usage: python3 bench/gpu/sdpa_compare.py [path/to/libpagedvl.so]
With no argument it uses the installed package's library (`pip install .`
in a CUDA environment); a path sets PAGEDVL_LIBRARY, e.g. build/libpagedvl.so.
Needs a CUDA build of the library, a GPU and PyTorch. Not run by ctest.
"""
import os
import statistics
import sys
import time

if len(sys.argv) > 1:
    os.environ["PAGEDVL_LIBRARY"] = os.path.abspath(sys.argv[1])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pagedvl as pv  # noqa: E402


def make_cache(layers, blocks, hq=32, hkv=8, d=128, bs=16):
    return pv.Cache(backend="cuda", dtype="bf16", num_layers=layers, num_q_heads=hq,
                    num_kv_heads=hkv, head_dim=d, block_size=bs, num_blocks=blocks)


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
    with make_cache(1, batch * (ctx // bs + 3) + 16, hq, hkv, d, bs) as cache:
        k = torch.randn(batch, ctx + 1, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
        out = torch.full_like(q, float("nan"))
        seqs = []
        for b in range(batch):
            sid = cache.seq_add(ctx)
            cache.kv_write(sid, 0, 0, k[b, :ctx], v[b, :ctx])
            seqs.append(sid)
        cache.seq_append(seqs)
        with cache.plan(batch) as plan:
            plan.build(seqs)
            plan.kv_write(0, k[:, ctx].contiguous(), v[:, ctx].contiguous())

            def ours():
                plan.attention_decode(0, q, out)

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
    return rel, t_ours, t_sdpa


def compress_case(m=2940, visual=(5, 2885), layers=32, hq=32, hkv=8, d=128):
    with make_cache(layers, layers * (m // 16 + 3) + 16, hq, hkv, d) as cache:
        sid = cache.seq_add(m, visual=[visual])
        k = torch.randn(layers, m, hkv, d, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        qfull = torch.randn(layers, m, hq, d, device="cuda", dtype=torch.bfloat16)
        for layer in range(layers):
            cache.kv_write(sid, layer, 0, k[layer], v[layer])
        pol = pv.Policy.vlcache()
        rows = cache.policy_rows(pol, sid)
        windows = [qfull[layer, rows.first:rows.first + rows.n].contiguous()
                   for layer in range(layers)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(layers):
            cache.observe(sid, layer, windows[layer], rows.first, pol)
        report = cache.compress(sid, pol)
        torch.cuda.synchronize()
        t_ours = (time.perf_counter() - t0) * 1e6
    qd = qfull.transpose(1, 2)  # [L, Hq, m, d]
    kd = k.transpose(1, 2)
    vd = v.transpose(1, 2)

    def prefill():
        for layer in range(layers):
            F.scaled_dot_product_attention(qd[layer:layer + 1], kd[layer:layer + 1],
                                           vd[layer:layer + 1], is_causal=True,
                                           enable_gqa=True)

    t_prefill = cuda_time(prefill, reps=5, warm=2)
    return t_ours, t_prefill, rows.n, report


def main():
    print(f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"libpagedvl {pv.__version__} ({pv.library_path})")
    print("batch,context,rel_err,pvl_us,sdpa_us,speedup")
    for batch, ctx in [(1, 4096), (8, 4096), (64, 4096), (1, 32768), (16, 16384)]:
        rel, a, b = decode_case(batch, ctx)
        print(f"{batch},{ctx},{rel:.2e},{a:.1f},{b:.1f},{b / a:.2f}", flush=True)
    t_ours, t_prefill, rows, rep = compress_case()
    print("observe_compress_us,prefill_sdpa_us,window_rows,fraction,keep_ratio,"
          "blocks_before,blocks_after")
    print(f"{t_ours:.0f},{t_prefill:.0f},{rows},{t_ours / t_prefill:.3f},"
          f"{rep.keep_ratio:.3f},{rep.blocks_before},{rep.blocks_after}")


if __name__ == "__main__":
    main()
