"""Quick GPU probe: time the Triton backend against SDPA flash on a few shapes (fwd and fwd+bwd), bf16 causal.

A development aid between full benchmark runs; bench/bench_attention.py is the benchmark of record.
"""
import sys
import time

import torch
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

from scaled_rope import RopeScaling, scaled_rope_attention

print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__, flush=True)
shapes = [(4, 32, 4096, 128), (1, 32, 16384, 128), (8, 16, 4096, 64)]
if len(sys.argv) > 1 and sys.argv[1] == "--one":
    shapes = shapes[1:2]
for (b, h, n, d) in shapes:
    rope = RopeScaling.longrope(d, 4096, 131072, [1.0 + i / d for i in range(d // 2)],
                                [2.0 + i for i in range(d // 2)], n_hat=4)
    q, k, v = (torch.randn(b, n, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    flops = 4 * b * h * n * n * d / 2
    t0 = time.time()
    ours = lambda: scaled_rope_attention(q, k, v, rope, backend="triton")  # noqa: E731
    ours()
    torch.cuda.synchronize()
    print(f"  first call (autotune+compile) {time.time() - t0:.1f}s", flush=True)
    qt, kt, vt = (x.detach().transpose(1, 2) for x in (q, k, v))

    def sdpa():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    res = {}
    for name, fn in (("ours", ours), ("sdpa_flash", sdpa)):
        ms = triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")
        res[name] = ms
    do = torch.randn_like(q)
    ms_fb = triton.testing.do_bench(lambda: ours().backward(do), warmup=50, rep=300, return_mode="median",
                                    grad_to_none=[q, k, v])
    qg, kg, vg = (x.detach().transpose(1, 2).requires_grad_(True) for x in (q, k, v))

    def sdpa_fb():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=True).backward(do.transpose(1, 2))

    ms_sfb = triton.testing.do_bench(sdpa_fb, warmup=50, rep=300, return_mode="median", grad_to_none=[qg, kg, vg])
    tf = lambda ms, f=flops: f / ms / 1e9  # noqa: E731
    print(f"B{b} H{h} N{n} D{d}: fwd ours {res['ours']:.3f} ms ({tf(res['ours']):.0f} TF/s)  sdpa-flash "
          f"{res['sdpa_flash']:.3f} ms ({tf(res['sdpa_flash']):.0f})  | fwd+bwd ours {ms_fb:.3f} ms "
          f"({tf(ms_fb, flops * 3.5):.0f})  sdpa-flash {ms_sfb:.3f} ms ({tf(ms_sfb, flops * 3.5):.0f})", flush=True)
    del q, k, v, qg, kg, vg
    torch.cuda.empty_cache()
