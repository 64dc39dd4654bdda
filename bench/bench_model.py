"""End to end: prefill and decode tokens/s of real models' shapes (random weights, bf16), patched vs transformers.

Models (the attention shapes and rope types of the real ones; random weights, fewer layers where noted):
  llama3.2-1b  16 layers, hidden 2048, 32 query / 8 KV heads of 64, MLP 8192, vocab 128256, llama3 rope x32 (1.24B)
  llama3.1-8b  4 of 32 layers, hidden 4096, 32 / 8 heads of 128, MLP 14336, llama3 rope x8
  qwen2.5-7b   4 of 28 layers, hidden 3584, 28 / 4 heads of 128, MLP 18944, YaRN x4 (original 32768)
  phi3-mini    4 of 32 layers, hidden 3072, 32 / 32 heads of 96, MLP 8192, LongRoPE (original 4096: the 4k prompt is
               4064 tokens, so generation crosses the original length and switches to the long factors)
For each prompt length (4k, 32k), the same weights run as:
  transformers          the stock model, attn_implementation="sdpa" (SDPA's default backend), DynamicCache
  scaled_rope           the same model after `patch_model` (unrotated keys, rope inside the kernels, "auto")
  transformers compiled StaticCache + torch.compile(model.forward, mode="reduce-overhead", fullgraph=True) for the
                        decode steps: transformers' own fast decode path (prefill eager, as generate() does)
  scaled_rope compiled  the patched model the same way (the attention is a registered torch.library op)
  scaled_rope hwfa      (--hwfa models) a different model on the same weights: HWFA layout (seed 004), every layer
                        but the last attends within 4096 keys with RoPE, the last attends to all keys with NoPE and
                        log-n scaling (`hwfa_layers`); against "scaled_rope", its cost relative to full attention
prefill = one forward over the prompt into an empty cache (logits of the last token only, as generate() does);
decode = greedy steps of one token over that cache, timed together (host overhead included). Medians of
CUDA-synchronised wall times. Also checks that both give the same next token after the prompt. A run that fails
(out of memory, missing kernel) is recorded as n/a with the error. Prints versions, progress and a markdown table;
writes model-<date>-<gpu>.json to bench/results (or --out, a directory or a .json path).

    python bench/bench_model.py [--out DIR|PATH] [--quick] [--models a,b] [--prompts 4096,32768]
                                [--compiled a,b|all|none] [--hwfa a,b|all|none]

--quick: 4k prompts only, fewer decode steps. --models: which models (default all). --compiled: models that also
get the compiled rows (default llama3.2-1b: each compiled row costs a compilation per prompt length). Without a
GPU it runs a tiny model on the CPU (reference backend) as a smoke test and says so.
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
LLAMA_8B = dict(LLAMA_1B, hidden_size=4096, intermediate_size=14336, num_hidden_layers=4, head_dim=128,
                tie_word_embeddings=False,
                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192})
QWEN_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=4,
               num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rms_norm_eps=1e-6,
               rope_parameters={"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
                                "original_max_position_embeddings": 32768})
PHI3_PAIRS = 48
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=4,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=131072,
                 original_max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                  "short_factor": [1.0 + 0.2 * i / PHI3_PAIRS for i in range(PHI3_PAIRS)],
                                  "long_factor": [1.0 + 40.0 * (i / PHI3_PAIRS) ** 2 for i in range(PHI3_PAIRS)],
                                  "original_max_position_embeddings": 4096})
MODELS = {"llama3.2-1b": ("llama", LLAMA_1B), "llama3.1-8b": ("llama", LLAMA_8B), "qwen2.5-7b": ("qwen2", QWEN_7B),
          "phi3-mini": ("phi3", PHI3_MINI)}
HWFA_WINDOW = 4096  # HWFA rows: window layers of 4096 keys, the last layer full with NoPE and log-n (base 4096)
TINY = dict(LLAMA_1B, vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32)


def build_model(family: str, shape: dict, device: str, dtype: torch.dtype):
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[family]
    config = config_cls(attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0, **shape)
    torch.manual_seed(0)
    # built in dtype as from_pretrained(dtype=...) builds: the rotary buffers stay float32 (a cast of the model to
    # bf16 would round the inverse frequencies and wreck stock transformers' angles at long positions)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(model, ids, steps: int, device: str, cache=None, step_fn=None):
    """(prefill seconds, decode seconds for `steps` tokens, next token after the prompt, last-token logits): prefill
    into an empty cache (a new DynamicCache, or `cache` reset), then greedy one-token steps through step_fn (the
    model itself, or its compiled forward over a StaticCache)."""
    from transformers import DynamicCache

    prompt = ids.shape[1]
    if cache is None:
        cache = DynamicCache(config=model.config)
    else:
        cache.reset()
    synchronize(device)
    t0 = time.perf_counter()
    out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t1 = time.perf_counter()
    first, first_logits = token.clone(), out.logits[:, -1].float()
    for i in range(steps):
        if step_fn is None:
            out = model(token, past_key_values=cache, use_cache=True)
        else:
            position = torch.full((1, 1), prompt + i, dtype=torch.long, device=device)
            torch.compiler.cudagraph_mark_step_begin()
            out = step_fn(input_ids=token, past_key_values=cache, position_ids=position,
                          cache_position=position[0], use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    synchronize(device)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, first, first_logits


def measure(model, prompt: int, steps: int, repeats: int, device: str, compiled: bool = False) -> dict:
    ids = torch.randint(1, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(prompt))
    try:
        with torch.no_grad():
            if compiled:
                from transformers import StaticCache

                torch._dynamo.reset()
                cache = StaticCache(config=model.config, max_cache_len=prompt + steps + 8)
                step_fn = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
                run = lambda n: run_once(model, ids, n, device, cache, step_fn)  # noqa: E731
            else:
                run = lambda n: run_once(model, ids, n, device)  # noqa: E731
            run(min(steps, 4))  # compile / autotune / record graphs / warm the allocator
            runs = [run(steps) for _ in range(repeats)]
    except Exception as exc:  # a configuration that cannot run here is recorded, not fatal
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
    parser.add_argument("--quick", action="store_true", help="4k prompts only, fewer decode steps")
    parser.add_argument("--models", default="", help=f"comma-separated models (default all: {', '.join(MODELS)})")
    parser.add_argument("--prompts", default="", help="comma-separated prompt lengths (default 4096,32768; "
                        "--quick: 4096)")
    parser.add_argument("--hwfa", default="llama3.2-1b",
                        help="models that also get the HWFA row: a list, 'all' or 'none'")
    parser.add_argument("--compiled", default="llama3.2-1b",
                        help="models that also get the compiled StaticCache rows: a list, 'all' or 'none'")
    args = parser.parse_args()

    import transformers

    from scaled_rope.integrations.transformers import hwfa_layers, patch_model, unpatch_model

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
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    if cuda:
        names = [m for m in args.models.split(",") if m] or list(MODELS)
        unknown = set(names) - set(MODELS)
        if unknown:
            parser.error(f"--models takes {', '.join(MODELS)}; got {sorted(unknown)}")
        compiled = set(MODELS) if args.compiled == "all" else set() if args.compiled == "none" else \
            set(args.compiled.split(","))
        hwfa = set(MODELS) if args.hwfa == "all" else set() if args.hwfa == "none" else set(args.hwfa.split(","))
        plans = [(name, *MODELS[name]) for name in names]
        dtype, backend = torch.bfloat16, "auto"
        prompts, steps, repeats = ([4096], 32, 2) if args.quick else ([4096, 32768], 64, 3)
        if args.prompts:
            prompts = [int(p) for p in args.prompts.split(",")]
    else:
        print("bench_model: no CUDA GPU; running a tiny model on the CPU with the reference backend (smoke test, "
              "timings mean nothing)")
        plans, compiled, hwfa = [("tiny", "llama", TINY)], set(), set()
        dtype, backend = torch.float32, "reference"
        prompts, steps, repeats = [64, 128], 4, 1
    env.update(dtype=str(dtype).replace("torch.", ""), backend=backend)

    rows = []
    start = time.time()

    def save() -> Path:  # after every model, so a run cut short keeps what it measured
        return write_results(args.out, "model", env["gpu"], {
            "date": today(), "env": env, "models": {name: dict(shape) for name, _, shape in plans},
            "method": "median wall time (CUDA-synchronised) of prefill into an empty cache and of greedy one-token "
                      "decode steps, batch 1; compiled rows: StaticCache + torch.compile(mode='reduce-overhead', "
                      "fullgraph=True) for the decode steps",
            "results": rows})

    for name, family, shape in plans:
        model = build_model(family, shape, device, dtype)
        params = sum(p.numel() for p in model.parameters())
        print(f"[{time.time() - start:6.0f}s] {name}: {params / 1e9:.2f}B parameters, {shape['num_hidden_layers']} "
              f"layers", flush=True)
        for prompt in prompts:
            if name == "phi3-mini" and prompt == 4096:
                prompt -= 32  # generation crosses the original length (4096) after 32 steps
            variants = [("transformers", False, False), ("scaled_rope", True, False)]
            if name in compiled:
                variants += [("transformers compiled", False, True), ("scaled_rope compiled", True, True)]
            if name in hwfa:
                variants.append(("scaled_rope hwfa", True, False))
            results = {}
            for impl, patched, compile_it in variants:
                if patched:
                    layers = hwfa_layers(shape["num_hidden_layers"], window=HWFA_WINDOW, full_layers=(-1,),
                                         logn_base=HWFA_WINDOW) if impl.endswith("hwfa") else None
                    patch_model(model, backend=backend, layers=layers)
                results[impl] = measure(model, prompt, steps, repeats, device, compiled=compile_it)
                if patched:
                    unpatch_model(model)
                shown = results[impl].get("error") or (f"prefill {results[impl]['prefill_ms']:.1f} ms, decode "
                                                      f"{results[impl]['decode_ms_per_token']:.2f} ms/token")
                print(f"[{time.time() - start:6.0f}s] {name} prompt {prompt} {impl}: {shown}", flush=True)
            for impl, result in results.items():
                base = results["transformers compiled" if "compiled" in impl else "transformers"]
                check = {}
                if "logits" in base and "logits" in result and impl.startswith("scaled_rope") and \
                        not impl.endswith("hwfa"):  # another model: no logits to compare
                    check = {"same_next_token": base["next_token"] == result["next_token"],
                             "max_abs_logit_diff": (base["logits"] - result["logits"]).abs().max().item(),
                             "logit_scale": base["logits"].abs().max().item()}
                rows.append({"model": name, "prompt": prompt, "impl": impl, "decode_steps": steps,
                             "layers": shape["num_hidden_layers"], "params": params,
                             **{k: v for k, v in result.items() if k != "logits"}, **check})
        del model
        if cuda:
            torch.cuda.empty_cache()
        path = save()

    print("\n| model | prompt | impl | prefill ms | decode ms/token | vs transformers (prefill / decode) | "
          "vs transformers compiled (decode) |")
    print("|---|---:|---|---:|---:|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['model']} | {row['prompt']} | {row['impl']} | n/a | n/a | {row['error']} | |")
            continue
        same = [r for r in rows if r["model"] == row["model"] and r["prompt"] == row["prompt"] and "error" not in r]
        eager = next((r for r in same if r["impl"] == "transformers"), None)
        fast = next((r for r in same if r["impl"] == "transformers compiled"), None)
        ratio = fast_ratio = ""
        if eager is not None and row is not eager:
            ratio = (f"{eager['prefill_ms'] / row['prefill_ms']:.2f}x / "
                     f"{eager['decode_ms_per_token'] / row['decode_ms_per_token']:.2f}x")
        if fast is not None and row is not fast:
            fast_ratio = f"{fast['decode_ms_per_token'] / row['decode_ms_per_token']:.2f}x"
        print(f"| {row['model']} | {row['prompt']} | {row['impl']} | {row['prefill_ms']:.1f} | "
              f"{row['decode_ms_per_token']:.2f} | {ratio} | {fast_ratio} |")
    for row in rows:
        if "same_next_token" in row:
            print(f"{row['model']} prompt {row['prompt']} {row['impl']}: same next token {row['same_next_token']}, "
                  f"max |logit diff| {row['max_abs_logit_diff']:.3g} (logits up to {row['logit_scale']:.3g})")

    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
