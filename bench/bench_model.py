"""End to end: prefill and decode tokens/s of a Llama-shaped model (random weights, bf16), patched vs transformers.

The model has Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query / 8 KV heads of 64, MLP 8192, vocab 128256,
tied embeddings, llama3 rope with factor 32: 1.24B parameters) and random weights. For each prompt length:
  transformers-sdpa   the stock model with attn_implementation="sdpa" (rotated keys in a DynamicCache)
  scaled_rope         the same model after `patch_model` (unrotated keys, rope inside the kernels, backend "auto")
prefill = one forward over the prompt into an empty DynamicCache (logits of the last token only, as generate()
does); decode = greedy steps of one token over that cache, timed together (host overhead included). Medians of
CUDA-synchronised wall times. Also checks that both give the same next token after the prompt. A run that fails
(out of memory, missing kernel) is recorded as n/a with the error. Prints versions and a markdown table; writes
model-<date>-<gpu>.json to bench/results (or --out, a directory or a .json path).

    python bench/bench_model.py [--out DIR|PATH] [--quick]

--quick: prompts 1k and 4k, fewer decode steps. Without a GPU it runs a tiny model on the CPU (reference backend)
as a smoke test and says so.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from _results import today, write_results

import torch

LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
                tie_word_embeddings=True, rms_norm_eps=1e-5,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
TINY = dict(LLAMA_1B, vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(model, ids, steps: int, device: str):
    """(prefill seconds, decode seconds for `steps` tokens, next token after the prompt, last-token logits)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    synchronize(device)
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    first, first_logits = token.clone(), out.logits[:, -1].float()
    for _ in range(steps):
        out = model(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, first, first_logits


def measure(model, prompt: int, steps: int, repeats: int, device: str) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(prompt))
    try:
        with torch.no_grad():
            run_once(model, ids, min(steps, 4), device)  # compile / autotune / warm the allocator
            runs = [run_once(model, ids, steps, device) for _ in range(repeats)]
    except (torch.cuda.OutOfMemoryError, RuntimeError, NotImplementedError, ValueError) as exc:
        if device == "cuda":
            torch.cuda.empty_cache()
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
    finally:
        if device == "cuda":
            torch.cuda.empty_cache()
    prefill = statistics.median(r[0] for r in runs)
    decode = statistics.median(r[1] for r in runs)
    return {"prefill_ms": prefill * 1e3, "prefill_tokens_per_s": prompt / prefill,
            "decode_ms_per_token": decode * 1e3 / steps, "decode_tokens_per_s": steps / decode,
            "next_token": int(runs[0][2]), "logits": runs[0][3]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="directory or .json path (default bench/results)")
    parser.add_argument("--quick", action="store_true", help="prompts 1k and 4k, fewer decode steps")
    args = parser.parse_args()

    import transformers

    from scaled_rope import explain_backend
    from scaled_rope.integrations.transformers import patch_model, unpatch_model

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = {"gpu": torch.cuda.get_device_name() if cuda else "none (CPU smoke test)", "torch": torch.__version__,
           "transformers": transformers.__version__, "cuda": torch.version.cuda,
           "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    print(" | ".join(f"{k}: {v}" for k, v in env.items()))
    if cuda:
        shape, dtype, backend = LLAMA_1B, torch.bfloat16, "auto"
        prompts, steps, repeats = ([1024, 4096], 32, 2) if args.quick else ([4096, 32768], 64, 3)
    else:
        print("bench_model: no CUDA GPU; running a tiny model on the CPU with the reference backend (smoke test, "
              "timings mean nothing)")
        shape, dtype, backend = TINY, torch.float32, "reference"
        prompts, steps, repeats = [64, 128], 4, 1
    model = build_model(shape, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    probe = torch.empty(1, 1, shape["num_attention_heads"], shape["head_dim"], device=device, dtype=dtype)
    chosen = backend if backend != "auto" else explain_backend(probe)[0]
    env.update(dtype=str(dtype).replace("torch.", ""), params=params, backend=chosen)
    print(f"model: Llama-shaped, {params / 1e9:.2f}B parameters, {env['dtype']}, scaled_rope backend {chosen}")

    rows = []
    for prompt in prompts:
        stock = measure(model, prompt, steps, repeats, device)
        patch_model(model, backend=backend)
        ours = measure(model, prompt, steps, repeats, device)
        unpatch_model(model)
        check = {}
        if "logits" in stock and "logits" in ours:
            check = {"same_next_token": stock["next_token"] == ours["next_token"],
                     "max_abs_logit_diff": (stock["logits"] - ours["logits"]).abs().max().item(),
                     "logit_scale": stock["logits"].abs().max().item()}
        for name, result in (("transformers-sdpa", stock), ("scaled_rope", ours)):
            result.pop("logits", None)
            rows.append({"prompt": prompt, "impl": name, "decode_steps": steps, **result, **check})

    print("\n| prompt | impl | prefill tok/s | prefill ms | decode tok/s | decode ms/token | vs transformers "
          "(prefill / decode) |")
    print("|---:|---|---:|---:|---:|---:|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['prompt']} | {row['impl']} | n/a | n/a | n/a | n/a | {row['error']} |")
            continue
        base = next(r for r in rows if r["prompt"] == row["prompt"] and r["impl"] == "transformers-sdpa")
        ratio = ""
        if row["impl"] != "transformers-sdpa" and "error" not in base:
            ratio = (f"{row['prefill_tokens_per_s'] / base['prefill_tokens_per_s']:.2f}x / "
                     f"{row['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x")
        print(f"| {row['prompt']} | {row['impl']} | {row['prefill_tokens_per_s']:,.0f} | {row['prefill_ms']:.1f} | "
              f"{row['decode_tokens_per_s']:.1f} | {row['decode_ms_per_token']:.2f} | {ratio} |")
    for row in rows:
        if row["impl"] == "scaled_rope" and "same_next_token" in row:
            print(f"prompt {row['prompt']}: same next token {row['same_next_token']}, max |logit diff| "
                  f"{row['max_abs_logit_diff']:.3g} (logits up to {row['logit_scale']:.3g})")

    path = write_results(args.out, "model", env["gpu"], {
        "date": today(), "env": env, "model": dict(shape),
        "method": "median wall time (CUDA-synchronised) of prefill into an empty DynamicCache and of greedy "
                  "one-token decode steps, batch 1",
        "results": rows})
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
