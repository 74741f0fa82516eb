#!/usr/bin/env python3
"""A continuous-batching server loop over libpagedvl, shaped like vLLM's
scheduler, on synthetic vision-language requests.

Each step of the loop:
  1. requests whose arrival time has come join the waiting queue;
  2. admission, in order, while the cache says Admit.OK for the head of the
     queue: seq_add, prefill (kv_write of every layer), then, with a policy,
     observe the post-vision window and compress (VL-Cache frees most of
     the prompt's blocks at once); Admit.NEVER refuses the request;
  3. one decode step for every running request: if the pool cannot serve
     the batch's append (blocks_for_append > free blocks), the newest
     running request is preempted (freed, and re-queued at the head of the
     waiting queue to be recomputed: prompt plus the tokens it had made),
     as vLLM's recompute preemption does; then seq_append, plan build, and
     per layer kv_write of the new token and decode attention;
  4. finished requests are freed.
K, V and Q are random: this exercises the cache and the scheduler, not a
model. By default the same workload runs twice on the same pool, without
compression and with --policy (vlcache), and the two are printed side by
side. On a GPU (--backend cuda, or auto with a usable device) the data are
torch tensors on the cache's device.

  python3 examples/python/serve.py                # CPU: a few seconds
  python3 examples/python/serve.py --policy h2o --keep 0.2 --requests 40
  python3 examples/python/serve.py --no-compare   # the policy only
"""
import argparse
import collections
import dataclasses
import sys
import time

import numpy as np

import pagedvl as pv


@dataclasses.dataclass
class Request:
    rid: int
    arrival: int        # step at which it arrives
    n_image: int        # visual tokens, at prompt positions [prefix, prefix + n_image)
    n_text: int
    max_new: int        # tokens to generate
    generated: int = 0
    seq: int = 0
    preempted: int = 0

    @property
    def prefix(self):
        return 5

    @property
    def n_prompt(self):
        # A preempted request is recomputed: its tokens so far become prompt.
        return self.prefix + self.n_image + self.n_text + self.generated


def workload(n, seed, image_tokens, text_max, new_max, rate):
    """n requests with Poisson arrivals (rate per step), 1-2 images each."""
    g = np.random.default_rng(seed)
    t, out = 0.0, []
    for i in range(n):
        t += g.exponential(1.0 / rate)
        out.append(Request(rid=i, arrival=int(t), n_image=int(g.integers(1, 3)) * image_tokens,
                           n_text=int(g.integers(8, text_max + 1)),
                           max_new=int(g.integers(new_max // 2, new_max + 1))))
    return out


class Data:
    """Random K/V/Q in the cache's dtype, numpy on the CPU, torch on CUDA."""

    def __init__(self, cache, seed):
        self.cfg = cache.config
        self.cuda = self.cfg.backend == pv.Backend.CUDA
        if self.cuda:
            import torch
            self.torch = torch
            self.gen = torch.Generator(device=f"cuda:{self.cfg.device}").manual_seed(seed)
            self.dtype = {pv.DType.F16: torch.float16, pv.DType.BF16: torch.bfloat16,
                          pv.DType.F32: torch.float32}[self.cfg.dtype]
        else:
            self.g = np.random.default_rng(seed)
            self.dtype = pv.numpy_dtype(self.cfg.dtype)

    def rand(self, *shape, sharp=1.0):
        if self.cuda:
            t = self.torch.randn(shape, generator=self.gen, device=f"cuda:{self.cfg.device}")
            return (t * sharp).to(self.dtype)
        x = self.g.standard_normal(shape, dtype=np.float32) * sharp
        if self.cfg.dtype == pv.DType.BF16 and self.dtype == np.uint16:
            return (x.view(np.uint32) >> 16).astype(np.uint16)
        return x.astype(self.dtype)

    def kv(self, n):
        c = self.cfg
        return self.rand(n, c.num_kv_heads, c.head_dim), self.rand(n, c.num_kv_heads, c.head_dim)

    def q(self, n, layer):
        # later layers attend more sharply (sparser), as VL-Cache measures
        c = self.cfg
        return self.rand(n, c.num_q_heads, c.head_dim, sharp=1.0 + 2.0 * layer / c.num_layers)


@dataclasses.dataclass
class Result:
    policy: str
    served: int = 0
    refused: int = 0
    prompt_tokens: int = 0      # prefilled, recomputations included
    decode_tokens: int = 0      # generated
    preemptions: int = 0
    steps: int = 0
    peak_blocks: int = 0
    final_blocks: int = 0
    saved_blocks: int = 0       # sum over compressions of blocks_before - blocks_after
    block_bytes: int = 0
    seconds: float = 0.0
    timeline: list = dataclasses.field(default_factory=list)  # (step, used, running, waiting)


def serve(args, policy_name, reqs):
    cache = pv.Cache(backend=args.backend, dtype=args.dtype, num_layers=args.layers,
                     num_q_heads=args.q_heads, num_kv_heads=args.kv_heads,
                     head_dim=args.head_dim, block_size=args.block_size,
                     num_blocks=args.blocks)
    res = Result(policy=policy_name, block_bytes=cache.stats().block_bytes)
    policy = None
    if policy_name != "none":
        policy = pv.Policy(policy_name, keep_ratio=args.keep)
    data = Data(cache, args.seed)
    L = args.layers
    plan = cache.plan(args.max_batch)
    pending = collections.deque(sorted(reqs, key=lambda r: r.arrival))
    waiting, running = collections.deque(), []
    t0 = time.perf_counter()
    step = 0
    while pending or waiting or running:
        while pending and pending[0].arrival <= step:
            waiting.append(pending.popleft())
        # ---- admission (FCFS; a preempted request is first in line) ----
        while waiting and len(running) < args.max_batch:
            r = waiting[0]
            admit = cache.can_add(r.n_prompt)
            if admit == pv.Admit.NEVER:
                waiting.popleft()
                res.refused += 1
                continue
            if admit != pv.Admit.OK:
                break
            image = (r.prefix, r.prefix + r.n_image)
            r.seq = cache.seq_add(r.n_prompt, visual=[image])
            waiting.popleft()
            res.prompt_tokens += r.n_prompt
            rows = cache.policy_rows(policy, r.seq) if policy else None
            for layer in range(L):
                k, v = data.kv(r.n_prompt)
                cache.kv_write(r.seq, layer, 0, k, v)
                if rows and rows.n:
                    cache.observe(r.seq, layer, data.q(rows.n, layer), rows.first, policy)
            if policy:
                rep = cache.compress(r.seq, policy)
                res.saved_blocks += rep.blocks_before - rep.blocks_after
            running.append(r)
        # ---- one decode step, preempting the newest while the pool is short ----
        while running:
            need = cache.blocks_for_append([r.seq for r in running])
            if need <= cache.stats().free_blocks:
                break
            victim = running.pop()  # the newest admitted
            cache.seq_free(victim.seq)
            victim.preempted += 1
            res.preemptions += 1
            waiting.appendleft(victim)
        if running:
            ids = [r.seq for r in running]
            cache.seq_append(ids)
            plan.build(ids)
            for layer in range(L):
                k, v = data.kv(len(ids))
                plan.kv_write(layer, k, v)
                plan.attention_decode(layer, data.q(len(ids), layer))
            res.decode_tokens += len(ids)
            still = []
            for r in running:
                r.generated += 1
                if r.generated >= r.max_new:
                    cache.seq_free(r.seq)
                    res.served += 1
                else:
                    still.append(r)
            running = still
        used = cache.stats().used_blocks
        res.peak_blocks = max(res.peak_blocks, used)
        res.timeline.append((step, used, len(running), len(waiting)))
        step += 1
        if step > args.max_steps:
            raise RuntimeError(f"no progress after {step} steps")
    if data.cuda:
        data.torch.cuda.synchronize()
    res.seconds = time.perf_counter() - t0
    res.steps = step
    res.final_blocks = cache.stats().used_blocks
    plan.close()
    cache.close()
    return res


def report(results, args, n_blocks):
    cols = [r.policy for r in results]
    rows = [
        ("requests served", lambda r: r.served),
        ("requests refused (never fit)", lambda r: r.refused),
        ("prompt tokens prefilled", lambda r: r.prompt_tokens),
        ("tokens generated", lambda r: r.decode_tokens),
        ("preemptions", lambda r: r.preemptions),
        ("steps", lambda r: r.steps),
        ("peak blocks in use", lambda r: r.peak_blocks),
        ("final blocks in use", lambda r: r.final_blocks),
        ("blocks saved by compression", lambda r: r.saved_blocks),
        ("MiB saved by compression", lambda r: f"{r.saved_blocks * r.block_bytes / 2**20:.1f}"),
        ("tokens/s", lambda r: f"{r.decode_tokens / max(r.seconds, 1e-9):.0f}"),
    ]
    w = max(len(n) for n, _ in rows)
    print(f"{'':{w}}  " + "  ".join(f"{c:>10}" for c in cols))
    for name, fn in rows:
        print(f"{name:{w}}  " + "  ".join(f"{fn(r):>10}" for r in results))
    print(f"\nblocks in use over time (pool {n_blocks}), every {args.every} steps:")
    for r in results:
        pts = [f"{u}" for s, u, _, _ in r.timeline if s % args.every == 0]
        print(f"  {r.policy:>9}: " + " ".join(pts))
    # One machine-readable line per run (tests parse it).
    for r in results:
        print(f"summary policy={r.policy} served={r.served} refused={r.refused} "
              f"prompt_tokens={r.prompt_tokens} tokens={r.decode_tokens} "
              f"preemptions={r.preemptions} steps={r.steps} peak_blocks={r.peak_blocks} "
              f"final_blocks={r.final_blocks} saved_blocks={r.saved_blocks}")


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backend", default="auto", choices=["cpu", "cuda", "auto"])
    p.add_argument("--dtype", default=None, choices=["f32", "f16", "bf16"],
                   help="default: f32 on the CPU, bf16 on CUDA")
    p.add_argument("--policy", default="vlcache",
                   help="compression policy (vlcache, h2o, snapkv, pyramidkv, streaming, full)")
    p.add_argument("--keep", type=float, default=0.1, help="keep ratio of the policy")
    p.add_argument("--compare", action=argparse.BooleanOptionalAction, default=True,
                   help="also run without compression on the same pool and workload")
    p.add_argument("--requests", type=int, default=24)
    p.add_argument("--rate", type=float, default=0.5, help="arrivals per step")
    p.add_argument("--image-tokens", type=int, default=None,
                   help="tokens per image (default: 576 on CUDA, 144 on the CPU)")
    p.add_argument("--text-max", type=int, default=48)
    p.add_argument("--new-max", type=int, default=32, help="most tokens generated per request")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=100000)
    p.add_argument("--layers", type=int, default=None, help="default: 32 on CUDA, 4 on the CPU")
    p.add_argument("--q-heads", type=int, default=None, help="default: 32 on CUDA, 8 on the CPU")
    p.add_argument("--kv-heads", type=int, default=None, help="default: 8 on CUDA, 2 on the CPU")
    p.add_argument("--head-dim", type=int, default=None, help="default: 128 on CUDA, 32 on the CPU")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--blocks", type=int, default=None,
                   help="pool size (default: 4096 on CUDA, 400 on the CPU)")
    p.add_argument("--every", type=int, default=10, help="timeline sampling, in steps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.policy != "none":
        pv.policy_parse(args.policy)  # PagedVLError for an unknown name
    cuda = args.backend == "cuda" or (args.backend == "auto" and _gpu_usable())
    args.backend = "cuda" if cuda else "cpu"
    defaults = dict(layers=(32, 4), q_heads=(32, 8), kv_heads=(8, 2), head_dim=(128, 32),
                    blocks=(4096, 400), image_tokens=(576, 144), dtype=("bf16", "f32"))
    for k, (gpu, cpu) in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, gpu if cuda else cpu)
    return args


def _gpu_usable():
    if not pv.backend_available("cuda"):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv=None):
    args = parse(argv)
    reqs = workload(args.requests, args.seed, args.image_tokens, args.text_max,
                    args.new_max, args.rate)
    print(f"# {args.requests} requests ({args.image_tokens}-token images, 1-2 per request, "
          f"up to {args.new_max} new tokens), backend {args.backend} {args.dtype}, "
          f"{args.layers} layers, pool {args.blocks} blocks of {args.block_size}")
    policies = (["none"] if args.compare and args.policy != "none" else []) + [args.policy]
    results = [serve(args, p, [dataclasses.replace(r) for r in reqs]) for p in policies]
    report(results, args, args.blocks)
    return results


if __name__ == "__main__":
    try:
        main()
    except pv.PagedVLError as e:
        sys.exit(f"serve.py: {e}")
