"""Where a decode step of a model goes, stock against patched (eager, DynamicCache): torch.profiler over a few
greedy steps after a prompt, the top ops by GPU time and by host time, and the wall time per step.

    python tools/profile_model_decode.py [--model llama3.2-1b] [--prompt 32768] [--steps 8] [--top 15]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_model import MODELS, build_model  # noqa: E402

from scaled_rope.integrations.transformers import patch_model, unpatch_model  # noqa: E402


def decode(model, ids, steps: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    torch.cuda.synchronize()
    return cache, token


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="llama3.2-1b", choices=sorted(MODELS))
    parser.add_argument("--prompt", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    family, shape = MODELS[args.model]
    model = build_model(family, shape, "cuda", torch.bfloat16)
    ids = torch.randint(1, model.config.vocab_size, (1, args.prompt), device="cuda")
    for name in ("stock", "patched"):
        if name == "patched":
            patch_model(model)
        with torch.no_grad():
            for record in (False, True):  # the first pass warms kernels and allocator
                cache, token = decode(model, ids, args.steps)
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                        torch.profiler.ProfilerActivity.CUDA]) if record else \
                        torch.autograd.profiler.record_function("warm") as prof:
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, True)
                    torch.cuda.synchronize()
                    wall = (time.perf_counter() - t0) / args.steps
        print(f"== {name}: {wall * 1e3:.2f} ms per step (profiled)", flush=True)
        table = prof.key_averages()
        print(table.table(sort_by="cuda_time_total", row_limit=args.top, max_name_column_width=60))
        print(table.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
        if name == "patched":
            unpatch_model(model)


if __name__ == "__main__":
    main()
