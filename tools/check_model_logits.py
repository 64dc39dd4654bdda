"""Where a patched model's bf16 logits part from stock: per-layer hidden states and last-token logits of one
prefill, stock and patched (each backend) in bf16, against stock in float32 on the same random weights.

    python tools/check_model_logits.py [--models llama3.1-8b,phi3-mini] [--prompt 4096]
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_model import MODELS, build_model  # noqa: E402

from scaled_rope.integrations.transformers import patch_model, unpatch_model  # noqa: E402


def hidden(model, ids):
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, logits_to_keep=1)
    return [h[0].float() for h in out.hidden_states] + [out.logits[0, -1].float()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="llama3.1-8b,phi3-mini")
    parser.add_argument("--prompt", type=int, default=4096)
    args = parser.parse_args()
    for name in args.models.split(","):
        family, shape = MODELS[name]
        model = build_model(family, shape, "cuda", torch.float32)
        prompt = args.prompt - 32 if name == "phi3-mini" else args.prompt
        ids = torch.randint(1, model.config.vocab_size, (1, prompt), device="cuda",
                            generator=torch.Generator("cuda").manual_seed(prompt))
        want = hidden(model, ids)
        runs = {"stock fp32": None}
        patch_model(model, backend="reference")
        runs["patched reference fp32"] = hidden(model, ids)
        unpatch_model(model)
        model.to(torch.bfloat16)
        runs["stock bf16"] = hidden(model, ids)
        for backend in ("auto", "triton", "cuda"):
            patch_model(model, backend=backend)
            try:
                runs[f"patched {backend} bf16"] = hidden(model, ids)
            except Exception as exc:  # a backend that does not take this shape
                print(f"{name} {backend}: {type(exc).__name__}: {str(exc)[:120]}")
            unpatch_model(model)
        print(f"== {name} prompt {prompt}: max |x - stock fp32| / max |stock fp32| per layer output, then logits")
        for label, got in runs.items():
            if got is None:
                continue
            rel = [((g - w).abs().max() / w.abs().max()).item() for g, w in zip(got, want)]
            print(f"{label:24s} " + " ".join(f"{r:.2e}" for r in rel), flush=True)
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
