"""Train a small Llama-style byte-level language model from scratch on the Python standard library's source.

    python bench/train_byte_model.py --out /tmp/byte-model            # full size: ~24M parameters, context 512,
                                                                       # 3000 steps of 64 x 512 bytes, a few minutes
                                                                       # on one H100/H200 (bf16 autocast)
    python bench/train_byte_model.py --out /tmp/tiny --tiny            # CPU smoke size: seconds

Why this model: the long-context evaluations (bench/bench_extension.py) need a real trained RoPE model with a short
training context, and nothing may be downloaded. Every machine with Python has its standard library, so the corpus
is the `.py` files under `sysconfig.get_paths()["stdlib"]` (site-packages excluded), read as bytes in sorted path
order; tokens are bytes (0..255) with 256 ending each file (`scaled_rope.evaluate.ByteTokenizer`). Files whose
CRC-32 of the relative path is 0 mod 20 (about 5%) are held out for evaluation and listed in the output's
byte_model.json, so bench_extension evaluates on text the model never saw. The corpus depends on the Python
version (recorded, with a checksum of the training bytes).

Deterministic: seeded initialisation and batch order (random windows of context + 1 bytes from one torch
Generator), fixed file order, AdamW with warmup and cosine decay. CPU runs repeat bit for bit; CUDA runs repeat up
to the nondeterminism of GPU reductions. `--max-seconds` shortens the schedule (fewer steps, decided after the
steps 6-25 are timed) when the projected time exceeds it; the steps run are recorded.

Size rationale (full): hidden 512, 8 layers, 8 query / 4 KV heads of 64 (32 rotary pairs), SwiGLU 1408: 24M
parameters. 3000 steps x 32768 tokens = 98M tokens (~3 passes over 30 MB); 6 * 24M * 98M = 1.4e16 FLOPs, under a
minute at 300 TFLOP/s effective and ~2-3 minutes at the ~100 TFLOP/s a model this narrow reaches without
torch.compile.

Writes to --out: model.safetensors + config.json (transformers LlamaForCausalLM), byte_model.json (corpus,
held-out files, settings, loss curve, held-out perplexity and bits per byte at the training context).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import torch

EOS = 256
VOCAB = 264  # 256 bytes + end of file, padded to a multiple of 8 (ids 257..263 unused)
FULL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
            num_key_value_heads=4, head_dim=64)
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16)
TRAIN_FULL = dict(context=512, steps=3000, batch=64, lr=1.5e-3, warmup=200)
TRAIN_TINY = dict(context=128, steps=20, batch=4, lr=3e-3, warmup=5)
TINY_TRAIN_FILES = 40  # --tiny trains on the first 40 training files only


# ---- corpus ------------------------------------------------------------------------------------------------------
def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the standard library's .py files (no site-/dist-packages), sorted."""
    return list(_listing(stdlib_root() if root is None else Path(root)))


@functools.lru_cache(maxsize=4)
def _listing(root: Path) -> tuple[str, ...]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if {"site-packages", "dist-packages", "__pycache__"} & set(rel.parts) or not path.is_file():
            continue
        files.append(rel.as_posix())
    return tuple(sorted(files))


def is_heldout(rel: str) -> bool:
    return zlib.crc32(rel.encode("utf-8")) % 20 == 0


def read_bytes(rel: str, root: Path | None = None) -> bytes:
    return ((stdlib_root() if root is None else root) / rel).read_bytes()


def document(rel: str, root: Path | None = None) -> torch.Tensor:
    """One file as token ids (bytes, no end marker), int64."""
    return _bytes_tensor(read_bytes(rel, root)).long()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    if not data:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def training_stream(files: list[str], root: Path | None = None) -> tuple[torch.Tensor, str]:
    """The training files concatenated, each followed by EOS (int16), and a SHA-256 of the stream."""
    parts, digest = [], hashlib.sha256()
    for rel in files:
        data = read_bytes(rel, root)
        digest.update(rel.encode() + b"\0" + data + b"\0")
        parts.append(_bytes_tensor(data).to(torch.int16))
        parts.append(torch.tensor([EOS], dtype=torch.int16))
    return torch.cat(parts), digest.hexdigest()


def heldout_documents(meta: dict, min_bytes: int, root: Path | None = None) -> list[str]:
    """Held-out files (from a model's byte_model.json) with at least min_bytes bytes, in sorted order."""
    root = stdlib_root() if root is None else root
    out = []
    for rel in meta["heldout_files"]:
        path = root / rel
        if not path.exists():
            raise FileNotFoundError(f"held-out file {rel} of the model is missing under {root}: the model was trained "
                                    f"with another Python ({meta.get('python')}); retrain it on this machine")
        if path.stat().st_size >= min_bytes:
            out.append(rel)
    return out


# ---- model -------------------------------------------------------------------------------------------------------
def make_config(tiny: bool, context: int):
    from transformers import LlamaConfig

    shape = TINY if tiny else FULL
    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=context,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                       initializer_range=0.02, tie_word_embeddings=False, attention_dropout=0.0,
                       bos_token_id=None, eos_token_id=EOS, pad_token_id=None, attn_implementation="sdpa", **shape)


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _lr(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def train(out: Path, *, tiny: bool = False, steps: int | None = None, batch: int | None = None,
          context: int | None = None, lr: float | None = None, seed: int = 0, device: str | None = None,
          max_seconds: float | None = None, log_every: int | None = None, quiet: bool = False) -> dict:
    """Train and save the model to `out`; returns the metadata written to out/byte_model.json."""
    from transformers import LlamaForCausalLM

    from scaled_rope.evaluate import perplexity

    defaults = TRAIN_TINY if tiny else TRAIN_FULL
    steps = defaults["steps"] if steps is None else steps
    batch = defaults["batch"] if batch is None else batch
    context = defaults["context"] if context is None else context
    lr = defaults["lr"] if lr is None else lr
    warmup = min(defaults["warmup"], max(1, steps // 10))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    log_every = log_every or (10 if tiny else 100)

    root = stdlib_root()
    files = stdlib_files(root)
    heldout = [f for f in files if is_heldout(f)]
    train_files = [f for f in files if not is_heldout(f)]
    if tiny:
        train_files = train_files[:TINY_TRAIN_FILES]
    started = time.perf_counter()
    data, digest = training_stream(train_files, root)
    say(f"corpus: {root} (Python {platform.python_version()}), {len(train_files)} training files "
        f"({data.numel() / 1e6:.1f} MB), {len(heldout)} held out; read in {time.perf_counter() - started:.1f} s")

    torch.manual_seed(seed)
    config = make_config(tiny, context)
    model = LlamaForCausalLM(config).to(device)
    params = sum(p.numel() for p in model.parameters())
    say(f"model: {params / 1e6:.1f}M parameters {FULL if not tiny else TINY}, context {context}, {steps} steps x "
        f"{batch} x {context} tokens, device {device}")
    fused = device.startswith("cuda")
    opt = torch.optim.AdamW(_param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            **({"fused": True} if fused else {}))
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stream = data.to(device)
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(context + 1, device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else \
        torch.autocast("cpu", enabled=False)
    model.train()
    curve, t0, step = [], time.perf_counter(), 0
    planned = steps
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, lr, warmup)
        starts = torch.randint(0, stream.numel() - context - 1, (batch,), generator=generator).to(device)
        window = stream[starts[:, None] + offsets].long()
        with autocast:
            logits = model(input_ids=window[:, :-1], use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 window[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % log_every == 0 or step == steps:
            value = loss.item()
            elapsed = time.perf_counter() - t0
            curve.append([step, value])
            say(f"step {step}/{steps}  loss {value:.4f}  {step * batch * context / elapsed / 1e3:.0f}k tokens/s  "
                f"{elapsed:.0f} s")
        if step in (5, 25) and max_seconds is not None and steps > 40:
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if step == 5:  # the first steps carry one-time costs (kernel selection, allocator warm-up)
                timed_from = time.perf_counter()
                continue
            per_step = (time.perf_counter() - timed_from) / 20
            fit = int((max_seconds - (time.perf_counter() - started)) / per_step)
            if fit < steps:
                steps = max(40, fit)
                say(f"--max-seconds {max_seconds:g}: {per_step * 1e3:.0f} ms/step, schedule shortened to "
                    f"{steps} steps")
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t0
    model.eval()

    # held-out loss at the training context: the first 40 held-out files (4 with --tiny), each cut to 64 windows
    eval_docs = [d[:64 * context] for d in (document(f, root) for f in heldout[: (4 if tiny else 40)])
                 if d.numel() >= 2]
    with torch.no_grad(), (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                           else torch.autocast("cpu", enabled=False)):
        ppl = perplexity(model, eval_docs, length=context, batch_size=16)
    say(f"held-out perplexity at {context}: {ppl:.3f} ({math.log2(ppl):.3f} bits per byte); trained in "
        f"{train_seconds:.0f} s")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    meta = {"format": "scaled_rope.byte_model/1", "tiny": tiny, "python": platform.python_version(),
            "stdlib": str(root), "training_files": len(train_files), "training_bytes": int(data.numel()),
            "training_sha256": digest, "heldout_files": heldout, "context": context, "steps": step,
            "planned_steps": planned, "batch": batch, "lr": lr, "warmup": warmup, "seed": seed,
            "parameters": params, "device": device, "train_seconds": train_seconds, "loss_curve": curve,
            "heldout_perplexity": ppl, "heldout_bits_per_byte": math.log2(ppl),
            "torch": torch.__version__}
    (out / "byte_model.json").write_text(json.dumps(meta, indent=1))
    say(f"saved to {out} ({time.perf_counter() - started:.0f} s in all)")
    return meta


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for the weights and metadata")
    parser.add_argument("--tiny", action="store_true", help="tiny model, few steps, CPU-friendly (tests)")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--context", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--max-seconds", type=float, help="shorten the schedule to fit this time (whole script)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "context"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be >= 1")
    print(f"python {platform.python_version()} | torch {torch.__version__} | "
          f"cuda {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}", flush=True)
    train(args.out, tiny=args.tiny, steps=args.steps, batch=args.batch, context=args.context, lr=args.lr,
          seed=args.seed, device=args.device, max_seconds=args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
