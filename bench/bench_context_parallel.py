"""Context-parallel scaled-RoPE attention on several GPUs against one GPU: throughput, scaling efficiency and peak
memory per GPU, forward and forward+backward.

    torchrun --nproc-per-node 2 bench/bench_context_parallel.py              # 2 GPUs (also 4 or 8)
    torchrun --nproc-per-node 2 bench/bench_context_parallel.py --ns 1048576 --reps 1

Cases: B1 H32 (K/V heads --hkv, default 32) D128 bf16, causal, LongRoPE (Phi-3-like factors, long set at these
lengths, n_hat 4) by default, at N = 128k, 256k, 512k and 1M tokens (--ns). For each N:
  1 GPU     scaled_rope_attention on the whole sequence, run by every rank at once on its own GPU (each GPU alone,
            as a user without context parallelism would run it); "n/a (OOM)" where it does not fit
  ring      scaled_rope.distributed.context_parallel_attention, zigzag sharding (--sharding)
  ulysses   scaled_rope.distributed.ulysses_attention (when H and Hkv are divisible by the world size)
Times are wall-clock medians over --reps runs after --warmup runs (the slowest rank's time, every rank
synchronised before each run). TFLOP/s = 4*B*H*N^2*D/2 for the causal forward, 3.5x that for forward+backward (the
DESIGN.md convention); "per GPU" divides by the world size. Speedup = 1-GPU time / W-GPU time; scaling efficiency
= speedup / W. Peak memory: torch.cuda.max_memory_allocated of the case, the largest over the ranks.
A correctness check at N = 8k (ring and Ulysses against one GPU on the whole sequence, bf16 tolerance) runs first
(--no-check skips it). Prints GPU, torch, triton, CUDA and NCCL versions, progress, one markdown table, and writes
context-parallel-<date>-<gpu>-w<W>.json to bench/results (or --out).

On a machine with fewer than 2 GPUs (or fewer than the processes started) it says so, runs a tiny CPU smoke test
over gloo with 2 processes (ring and Ulysses, forward and backward, against the single-process reference) and
exits 0. Expect N = 1M to take minutes per case on one GPU (about 9 PFLOP for the causal forward); run it alone with
--ns 1048576 --reps 1 when time is short. --no-autotune sets SCALED_ROPE_AUTOTUNE=0 (Triton tuning at these
lengths times every config once per length bucket).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

DEFAULT_NS = (131072, 262144, 524288, 1048576)
ORIGINAL, MAXIMUM, N_HAT = 4096, 2 ** 21, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ns", default=",".join(map(str, DEFAULT_NS)), help="comma-separated sequence lengths")
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--hkv", type=int, default=None, help="K/V heads (default: --heads)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rope", choices=("longrope", "default"), default="longrope")
    p.add_argument("--rerope-window", type=int, default=None)
    p.add_argument("--sharding", choices=("zigzag", "contiguous"), default="zigzag")
    p.add_argument("--schemes", default="ring,ulysses")
    p.add_argument("--passes", default="fwd,fwd+bwd")
    p.add_argument("--backend", default="auto")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-single", action="store_true", help="skip the 1-GPU runs")
    p.add_argument("--max-single-n", type=int, default=None, help="skip 1-GPU runs above this length")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--no-autotune", action="store_true")
    p.add_argument("--out", default=None, help="a directory or .json path (default: bench/results)")
    p.add_argument("--label", default="", help="what was measured (kernel versions), stored in the JSON")
    return p.parse_args(argv)


def make_rope(kind: str, dim: int):
    from scaled_rope import RopeScaling

    if kind == "default":
        return RopeScaling.default(dim)
    pairs = dim // 2
    short = [1.0 + 0.2 * i / pairs for i in range(pairs)]
    long_ = [1.0 + 40.0 * (i / pairs) ** 2 for i in range(pairs)]
    return RopeScaling.longrope(dim, ORIGINAL, MAXIMUM, short, long_, n_hat=N_HAT)


def versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
        try:
            info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        except Exception:  # noqa: BLE001  (reporting only)
            info["nccl"] = None
        info["gpus"] = torch.cuda.device_count()
    else:
        info["device"] = "cpu"
    return info


def say(*args):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


# ---- GPU run ----------------------------------------------------------------------------------------------------
def slowest(seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def agree(flag: bool) -> bool:
    """True on every rank when it is true on every rank."""
    t = torch.tensor([1 if flag else 0], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def measure(run, reps: int, warmup: int):
    """(median seconds over reps of the slowest rank, peak bytes on the worst rank) of run()."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(slowest(time.perf_counter() - start))
    peak = torch.tensor([torch.cuda.max_memory_allocated()], dtype=torch.float64, device="cuda")
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return statistics.median(times), float(peak.item())


def inputs(batch, n, heads, hkv, dim, seed, grad):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(batch, n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(batch, n, hkv, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(batch, n, hkv, dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return [x.requires_grad_(grad) for x in (q, k, v)]


def runner(fn, q, k, v, pass_: str):
    """A closure running one forward (no autograd) or forward+backward."""
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                fn(q, k, v)
        return run
    dout = torch.randn_like(q)

    def run():
        for x in (q, k, v):
            x.grad = None
        fn(q, k, v).backward(dout)
    return run


def check(args, rope, world, rank):
    """Ring and Ulysses against one GPU on the whole sequence at N = 8k (bf16: max |diff| <= 2e-2 of max |out|)."""
    from scaled_rope import scaled_rope_attention
    from scaled_rope.distributed import context_parallel_attention, shard_sequence, ulysses_attention

    n = 8192 if 8192 % (2 * world) == 0 else 2 * world * 1024
    hkv = args.hkv or args.heads
    q, k, v = inputs(1, n, args.heads, hkv, args.head_dim, seed=1, grad=False)  # same on every rank
    options = dict(causal=True, rerope_window=args.rerope_window, backend=args.backend)
    with torch.no_grad():
        want = scaled_rope_attention(q, k, v, rope, **options)
        local = [shard_sequence(x, rank, world, sharding=args.sharding) for x in (q, k, v)]
        want_local = shard_sequence(want, rank, world, sharding=args.sharding).float()
        scale = want.float().abs().max().item()
        results = {"ring": context_parallel_attention(*local, rope, sharding=args.sharding, **options)}
        if args.heads % world == 0 and hkv % world == 0:
            results["ulysses"] = ulysses_attention(*local, rope, sharding=args.sharding, **options)
    for name, got in results.items():
        err = slowest((got.float() - want_local).abs().max().item())
        ok = err <= 2e-2 * scale
        say(f"check N={n}: {name} max |diff| {err:.3e} (max |out| {scale:.3f}) {'ok' if ok else 'FAILED'}")
        if not agree(ok):
            raise SystemExit(f"{name} disagrees with one GPU at N={n}")


def gpu_main(args):
    from scaled_rope import scaled_rope_attention
    from scaled_rope.distributed import context_parallel_attention, ulysses_attention

    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=datetime.timedelta(minutes=60),
                            device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    env = versions()
    say(f"context parallel bench: {world} x {env['device']} | torch {env['torch']} | triton {env['triton']} | "
        f"CUDA {env['cuda']} | NCCL {env.get('nccl')}")
    heads, dim = args.heads, args.head_dim
    hkv = args.hkv or heads
    rope = make_rope(args.rope, dim)
    options = dict(causal=True, rerope_window=args.rerope_window, backend=args.backend)
    if not args.no_check:
        check(args, rope, world, rank)
    schemes = [s for s in args.schemes.split(",") if s]
    if "ulysses" in schemes and (heads % world or hkv % world):
        say(f"ulysses skipped: heads {heads} / K/V heads {hkv} not divisible by {world}")
        schemes.remove("ulysses")
    passes = [p for p in args.passes.split(",") if p]
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        if n % (2 * world):
            say(f"N={n} skipped: not divisible by 2 * world size")
            continue
        flops = 4 * 1 * heads * n * n * dim / 2
        single = {}
        if not args.no_single and (args.max_single_n is None or n <= args.max_single_n):
            for pass_ in passes:
                say(f"N={n} 1 GPU {pass_} ...")
                run = None
                try:  # the first run doubles as the first warm-up; every rank learns whether it fitted everywhere
                    q, k, v = inputs(1, n, heads, hkv, dim, seed=rank, grad=pass_ != "fwd")
                    run = runner(lambda a, b, c: scaled_rope_attention(a, b, c, rope, **options), q, k, v, pass_)
                    run()
                except torch.cuda.OutOfMemoryError:
                    run = None
                q = k = v = None
                if agree(run is not None):
                    seconds, peak = measure(run, args.reps, max(args.warmup - 1, 0))
                    single[pass_] = seconds
                    rows.append(row(n, "1 GPU", 1, pass_, seconds, peak, flops, None))
                else:
                    rows.append(dict(n=n, scheme="1 GPU", gpus=1, pass_=pass_, note="n/a (OOM)"))
                run = None
                torch.cuda.empty_cache()
                say(format_row(rows[-1]))
        for scheme in schemes:
            fn = context_parallel_attention if scheme == "ring" else ulysses_attention
            for pass_ in passes:
                say(f"N={n} {scheme} x{world} {pass_} ...")
                q, k, v = inputs(1, n // world, heads, hkv, dim, seed=100 + rank, grad=pass_ != "fwd")
                run = runner(lambda a, b, c: fn(a, b, c, rope, sharding=args.sharding, **options), q, k, v, pass_)
                seconds, peak = measure(run, args.reps, args.warmup)
                rows.append(row(n, scheme, world, pass_, seconds, peak, flops, single.get(pass_)))
                say(format_row(rows[-1]))
                q = k = v = run = None
                torch.cuda.empty_cache()
    say("")
    say(table(rows, world))
    if rank == 0:
        from _results import today, write_results

        payload = dict(date=today(), family="context-parallel", label=args.label, world_size=world,
                       env=dict(env, interpreter=False),
                       config=dict(batch=1, heads=heads, kv_heads=hkv, head_dim=dim, dtype="bfloat16", causal=True,
                                   rope=args.rope, rerope_window=args.rerope_window, sharding=args.sharding,
                                   backend=args.backend, reps=args.reps, warmup=args.warmup,
                                   autotune=not args.no_autotune),
                       rows=rows)
        path = write_results(args.out, "context-parallel", env["device"], payload, suffix=f"-w{world}")
        say(f"wrote {path}")
    dist.barrier()
    dist.destroy_process_group()


def row(n, scheme, gpus, pass_, seconds, peak, flops, single_seconds):
    total = flops * (3.5 if pass_ != "fwd" else 1.0)
    r = dict(n=n, scheme=scheme, gpus=gpus, pass_=pass_, ms=seconds * 1e3, tokens_per_s=n / seconds,
             tflops_per_gpu=total / seconds / gpus / 1e12, peak_gib_per_gpu=peak / 2 ** 30)
    if single_seconds is not None and gpus > 1:
        r["speedup"] = single_seconds / seconds
        r["efficiency"] = r["speedup"] / gpus
    return r


def format_row(r) -> str:
    if "note" in r:
        return f"  N={r['n']} {r['scheme']} {r['pass_']}: {r['note']}"
    extra = f", {r['speedup']:.2f}x one GPU ({100 * r['efficiency']:.0f}% efficiency)" if "speedup" in r else ""
    return (f"  N={r['n']} {r['scheme']} x{r['gpus']} {r['pass_']}: {r['ms']:.1f} ms, {r['tokens_per_s']:.0f} tok/s, "
            f"{r['tflops_per_gpu']:.0f} TFLOP/s per GPU, peak {r['peak_gib_per_gpu']:.1f} GiB/GPU{extra}")


def table(rows, world) -> str:
    lines = ["| N | scheme | GPUs | pass | ms | tokens/s | TFLOP/s per GPU | vs 1 GPU | scaling efficiency | "
             "peak GiB per GPU |", "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['n']} | {r['scheme']} | {r['gpus']} | {r['pass_']} | {r['note']} | | | | | |")
            continue
        speed = f"{r['speedup']:.2f}x" if "speedup" in r else "n/a"
        eff = f"{100 * r['efficiency']:.0f}%" if "efficiency" in r else "n/a"
        lines.append(f"| {r['n']} | {r['scheme']} | {r['gpus']} | {r['pass_']} | {r['ms']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tflops_per_gpu']:.0f} | {speed} | {eff} | "
                     f"{r['peak_gib_per_gpu']:.1f} |")
    return "\n".join(lines)


# ---- CPU smoke run ----------------------------------------------------------------------------------------------
def smoke(rank: int, world: int) -> None:
    """Tiny ring and Ulysses runs over gloo against the single-process reference, forward and backward."""
    from scaled_rope import reference
    from scaled_rope.distributed import context_parallel_attention, shard_sequence, ulysses_attention

    torch.set_num_threads(1)
    rope = make_rope("longrope", 32)
    n, heads = 16 * world, 2 * world
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, heads, 32, generator=g) for _ in range(3))
    dout = torch.randn(1, n, heads, 32, generator=g)
    full = [x.clone().requires_grad_(True) for x in (q, k, v)]
    want = reference.attention(*full, rope, causal=True)[0]
    want.backward(dout)
    for name, fn in (("ring", context_parallel_attention), ("ulysses", ulysses_attention)):
        start = time.perf_counter()
        local = [shard_sequence(x, rank, world).requires_grad_(True) for x in (q, k, v)]
        out = fn(*local, rope, sharding="zigzag", causal=True, backend="reference")
        out.backward(shard_sequence(dout, rank, world))
        errs = [(out - shard_sequence(want, rank, world)).abs().max().item()]
        errs += [(x.grad - shard_sequence(f.grad, rank, world)).abs().max().item() for x, f in zip(local, full)]
        worst = torch.tensor([max(errs)], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            print(f"  CPU smoke {name} x{world}: N={n} H={heads} D=32 LongRoPE causal, forward+backward "
                  f"{(time.perf_counter() - start) * 1e3:.0f} ms, max |error| vs reference {worst.item():.1e}",
                  flush=True)
        if worst.item() > 1e-4:
            raise SystemExit(f"CPU smoke: {name} disagrees with the reference ({worst.item():.2e})")


def _smoke_worker(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        smoke(rank, world)
    finally:
        dist.destroy_process_group()


def cpu_smoke(reason: str) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1:  # started by torchrun: these processes form the group
        dist.init_process_group("gloo")
        say(f"bench_context_parallel: {reason}; no GPU benchmark. CPU gloo smoke run instead "
            f"(torch {torch.__version__}):")
        try:
            smoke(dist.get_rank(), dist.get_world_size())
        finally:
            dist.destroy_process_group()
        return
    print(f"bench_context_parallel: {reason}; no GPU benchmark. CPU gloo smoke run with 2 processes instead "
          f"(torch {torch.__version__}):", flush=True)
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_smoke_worker, args=(2, os.path.join(tmp, "store")), nprocs=2)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.no_autotune:
        os.environ["SCALED_ROPE_AUTOTUNE"] = "0"
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if gpus < 2:
        cpu_smoke(f"needs 2 or more GPUs, found {gpus}")
        return 0
    if launched < 2:
        print(f"bench_context_parallel: {gpus} GPUs here, but this process was not started by torchrun; run\n"
              f"  torchrun --nproc-per-node {gpus} {sys.argv[0]}", flush=True)
        cpu_smoke("not launched with torchrun")
        return 0
    if launched > gpus:
        cpu_smoke(f"{launched} processes but only {gpus} GPUs")
        return 0
    gpu_main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
