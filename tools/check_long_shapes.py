"""GPU check at model-sized shapes the test tier does not reach: head_dim 64 and 128 with GQA 32/8 at 4096
tokens, default and explicit positions, bf16, under the docs/DESIGN.md §6.1 rule; then a 2-layer Llama-3.2-1B-shaped
model in float32, patched (Triton) against stock transformers (SDPA), at a 4096-token prompt.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from helpers import compare_attention, random_inputs  # noqa: E402

from scaled_rope import RopeScaling  # noqa: E402

failures = 0
for dim in (64, 128):
    rope = RopeScaling.llama3(dim, 32.0, 8192, 1.0, 4.0, base=500000.0)
    for explicit in (False, True):
        q, k, v = random_inputs(1, 4096, 4096, 32, 8, dim, torch.bfloat16, device="cuda", seed=dim)
        extra = {}
        if explicit:
            pos = torch.arange(4096, device="cuda")[None]
            extra = dict(q_positions=pos, k_positions=pos)
        try:
            compare_attention(q, k, v, rope, backend="triton", grads=False, **extra)
            print(f"ok   D{dim} GQA 32/8 N4096 bf16 explicit={explicit}", flush=True)
        except AssertionError as exc:
            failures += 1
            print(f"FAIL D{dim} GQA 32/8 N4096 bf16 explicit={explicit}: {exc}", flush=True)

from bench_model import LLAMA_1B  # noqa: E402
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM  # noqa: E402

from scaled_rope.integrations.transformers import patch_model  # noqa: E402

def make_config():  # one config per model: patch_model marks its model's config
    return LlamaConfig(attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=0,
                       **dict(LLAMA_1B, num_hidden_layers=2))


config = make_config()
torch.manual_seed(0)
with torch.device("cuda"):
    stock = LlamaForCausalLM(config).float().eval()
    patched = LlamaForCausalLM(make_config()).float().eval()
patched.load_state_dict(stock.state_dict())
patch_model(patched, backend="triton")
ids = torch.randint(1, config.vocab_size, (1, 4096), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
with torch.no_grad():
    a = stock(ids, past_key_values=DynamicCache(config=stock.config), use_cache=True).logits.float()
    b = patched(ids, past_key_values=DynamicCache(config=patched.config), use_cache=True).logits.float()
diff = (a - b).abs().max().item()
print(f"2-layer float32 model, 4096 tokens: max |logit diff| {diff:.3e} (logits up to {a.abs().max().item():.3g}); "
      f"same argmax at every position: {bool((a.argmax(-1) == b.argmax(-1)).all())}")
sys.exit(1 if failures else 0)
