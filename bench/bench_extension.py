"""Context extension without fine-tuning on a byte-level model trained at a short context: perplexity and passkey
retrieval at 1x..16x the training context for each scaling method, LongRoPE factors found by search, and the
search's throughput with our kernels against eager rope + SDPA.

    python bench/train_byte_model.py --out /tmp/byte-model && \\
        python bench/bench_extension.py --model /tmp/byte-model --out /tmp/extension
    python bench/bench_extension.py --tiny --out /tmp/ext-tiny      # CPU smoke run: trains a tiny model first

Methods (every one runs through `patch_model`, backend --backend; s = length / training context L0, each length
its own configuration except dynamic NTK):
  none            the model's own rope (no scaling)
  pi              linear interpolation, factor s
  ntk             NTK-aware base change, factor s
  dynamic_ntk     dynamic NTK (factor --dynamic-factor, one configuration for all lengths; per-row length)
  yarn            YaRN, factor s (beta 32/1, m = 0.1 ln s + 1)
  longrope        LongRoPE, long factors and n̂ searched at s (`scaled_rope.search.search_longrope`, fitness =
                  perplexity at s*L0 on held-out files disjoint from the evaluation files); at 1x the rope searched
                  for the smallest scale (short set = 1, its attention factor)
  longrope_no_nhat  the same search with n̂ fixed to 0
  rerope          ReRoPE, window L0/2
  leaky_rerope    Leaky ReRoPE, window L0/2, leak (L - w)/(L0 - w) so the largest relative position maps to L0
Perplexity: the evaluation files (held out from training, >= 16*L0 bytes) cut to 16*L0 bytes, windows of the
length, non-overlapping (`scaled_rope.evaluate.perplexity`). Passkey: `passkey_accuracy` with --trials prompts per
length (greedy decoding over the patched model's cache).

Search throughput: one LongRoPE search at 8x (n̂ = 0, the paper's population sizes) run for a fixed time with
evaluator="scaled_rope" (patch_model per candidate, backend --backend) and with evaluator="stock" (transformers'
eager rope + SDPA, the candidate written into config.rope_parameters and the rotary embedding rebuilt): candidates
per minute each (after one warm-up evaluation), and the fitness agreement on the candidates both evaluated.

--budget-seconds trims the searches (about half the budget for the LongRoPE searches, a sixth for the throughput
runs); the evaluations are not trimmed. Prints versions and progress; writes extension-<date>-<device>.json (via
bench/_results.py), a markdown table (.md) and a plot (.png, when matplotlib is installed) into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_byte_model as tbm  # noqa: E402
from _results import today, write_results  # noqa: E402

METHODS = ("none", "pi", "ntk", "dynamic_ntk", "yarn", "longrope", "longrope_no_nhat", "rerope", "leaky_rerope")
START = time.perf_counter()


def say(*parts) -> None:
    print(f"[{time.perf_counter() - START:6.1f} s]", *parts, flush=True)


def versions(device: str) -> dict:
    import transformers

    import scaled_rope

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "scaled_rope": scaled_rope.__version__, "device": device}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    env["interpreter"] = os.environ.get("TRITON_INTERPRET") == "1"
    return env


# ---- methods -------------------------------------------------------------------------------------------------------
def method_setting(name: str, length: int, l0: int, template, searched: dict, dynamic_factor: float) -> dict:
    """patch_model keyword arguments (rope, rerope_window, rerope_leak) of one method at one length."""
    from scaled_rope import RopeScaling

    s = length / l0
    kw = dict(base=template.base, rotary_dim=template.rotary_dim)
    hd = template.head_dim
    default = RopeScaling.default(hd, **kw)
    window = max(1, l0 // 2)
    if name == "none":
        return {"rope": default}
    if name == "pi":
        return {"rope": RopeScaling.linear(hd, s, **kw) if s > 1 else default}
    if name == "ntk":
        return {"rope": RopeScaling.ntk(hd, s, **kw) if s > 1 else default}
    if name == "dynamic_ntk":
        return {"rope": RopeScaling.dynamic_ntk(hd, dynamic_factor, l0, **kw)}
    if name == "yarn":
        return {"rope": RopeScaling.yarn(hd, s, l0, **kw) if s > 1 else default}
    if name in ("longrope", "longrope_no_nhat"):
        found = searched[name]
        if not found:
            return {}
        key = s if s in found else min(found)
        return {"rope": found[key].rope}
    if name == "rerope":
        return {"rope": default, "rerope_window": window}
    if name == "leaky_rerope":
        return {"rope": default, "rerope_window": window, "rerope_leak": max(1.0, (length - window) / (l0 - window))}
    raise ValueError(f"unknown method {name!r}")


def describe(setting: dict) -> str:
    parts = [repr(setting["rope"])] if "rope" in setting else []
    if setting.get("rope") is not None and setting["rope"].n_hat:
        parts.append(f"n_hat={setting['rope'].n_hat}")
    for k in ("rerope_window", "rerope_leak"):
        if setting.get(k) is not None:
            parts.append(f"{k}={setting[k]:g}")
    return ", ".join(parts)


# ---- phases ---------------------------------------------------------------------------------------------------------
def run_searches(model, search_docs, scales, l0, args, budget: float) -> tuple[dict, list]:
    from scaled_rope.search import search_longrope

    searched = {"longrope": {}, "longrope_no_nhat": {}}
    records = []
    targets = [s for s in scales if s > 1]
    if not targets:
        return searched, records
    # budget shares grow with the scale (log2(2s): a longer target costs more per candidate and has a larger space);
    # time a search leaves unused goes to the ones after it
    jobs = [(variant, s) for variant in ("longrope", "longrope_no_nhat") for s in targets]
    weights = [math.log2(2 * s) for _, s in jobs]
    started = time.perf_counter()
    sizes = search_sizes(args)
    for variant in ("longrope", "longrope_no_nhat"):
        previous = None
        for s in targets:
            index = jobs.index((variant, s))
            left = budget - (time.perf_counter() - started)
            per_search = max(0.0, left) * weights[index] / sum(weights[index:])
            length = s * l0
            seeds = {}
            if previous is not None:  # progressive: the previous scale's factors, stretched by the ratio
                ratio = s / previous[0]
                seeds["previous_scale"] = [x * ratio for x in previous[1].factors]
            checkpoint = None
            if args.checkpoint_dir is not None:
                checkpoint = args.checkpoint_dir / f"search-{variant}-{s}x.json"
            try:
                found = search_longrope(
                    model, [d[:length] for d in search_docs], target_length=length, original_length=l0,
                    n_hat_choices=None if variant == "longrope" else (0,), seeds=seeds, batch_size=len(search_docs),
                    backend=args.backend, seed=args.seed, progress=False, max_seconds=per_search,
                    checkpoint=checkpoint, **sizes)
            except Exception as exc:  # noqa: BLE001 - recorded; the method is then reported as not searched
                records.append({"method": variant, "scale": s, "target_length": length,
                                "error": f"{type(exc).__name__}: {exc}"})
                say(f"search {variant} {s}x: FAILED {records[-1]['error']}")
                continue
            searched[variant][s] = found
            previous = (s, found)
            say(f"search {variant} {s}x: perplexity {found.fitness:.4f}, n_hat {found.n_hat}, "
                f"{found.evaluations} candidates in {found.seconds:.1f} s ({found.candidates_per_minute:.0f}/min), "
                f"{found.generations} generations{' (stopped by the budget)' if found.stopped_early else ''}")
            records.append({"method": variant, "scale": s, "target_length": length, "fitness": found.fitness,
                            "n_hat": found.n_hat, "factors": list(found.factors), "evaluations": found.evaluations,
                            "seconds": found.seconds, "generations": found.generations,
                            "stopped_early": found.stopped_early,
                            "candidates_per_minute": found.candidates_per_minute,
                            "rope_parameters": found.rope_parameters(),
                            "seed_fitness": {h["origin"]: h["fitness"] for h in found.history
                                             if h["origin"].startswith("seed:")},
                            "best_by_generation": best_by_generation(found.history)})
    return searched, records


def search_sizes(args) -> dict:
    if args.tiny:
        return dict(population_size=6, parents=3, mutations=2, crossovers=2, generations=2)
    return dict(population_size=64, parents=32, mutations=16, crossovers=16, generations=40)


def best_by_generation(history: list[dict]) -> list[float]:
    best, out = math.inf, []
    for g in range(max(h["generation"] for h in history) + 1):
        best = min([best] + [h["fitness"] for h in history if h["generation"] == g])
        out.append(best)
    return out


def run_throughput(model, search_docs, scales, l0, args, budget: float) -> dict:
    from scaled_rope.evaluate import perplexity
    from scaled_rope.integrations.transformers import patch_model, unpatch_model
    from scaled_rope.search import search_longrope

    s = max([x for x in scales if 1 < x <= 8] or [max(scales)])
    length = s * l0
    tokens = [d[:length] for d in search_docs]
    out = {"scale": s, "target_length": length, "seconds_each": budget / 2}
    runs = {}
    for evaluator in ("scaled_rope", "stock"):
        if evaluator == "scaled_rope":  # warm-up: compile the kernels for this shape before timing
            patch_model(model, backend=args.backend)
            perplexity(model, tokens, length=length, batch_size=len(tokens))
            unpatch_model(model)
        else:
            perplexity(model, tokens, length=length, batch_size=len(tokens))
        runs[evaluator] = search_longrope(
            model, tokens, target_length=length, original_length=l0, n_hat_choices=(0,), evaluator=evaluator,
            batch_size=len(tokens), backend=args.backend, seed=args.seed, progress=False, max_seconds=budget / 2,
            **search_sizes(args))
        r = runs[evaluator]
        out[evaluator] = {"candidates": r.evaluations, "seconds": r.seconds,
                          "candidates_per_minute": r.candidates_per_minute, "best_fitness": r.fitness}
        say(f"throughput {evaluator}: {r.evaluations} candidates in {r.seconds:.1f} s = "
            f"{r.candidates_per_minute:.0f} candidates/min (best perplexity {r.fitness:.4f})")
    ours, stock = out["scaled_rope"]["candidates_per_minute"], out["stock"]["candidates_per_minute"]
    out["speedup"] = ours / stock if stock else None
    a = {(tuple(h["factors"]), h["n_hat"]): h["fitness"] for h in runs["scaled_rope"].history}
    b = {(tuple(h["factors"]), h["n_hat"]): h["fitness"] for h in runs["stock"].history}
    common = [k for k in a if k in b and math.isfinite(a[k]) and math.isfinite(b[k])]
    out["fitness_compared"] = len(common)
    out["fitness_max_relative_difference"] = max((abs(a[k] - b[k]) / b[k] for k in common), default=None)
    say(f"throughput: ours / stock = {out['speedup']:.2f}x; fitness of {len(common)} common candidates agrees to "
        f"{out['fitness_max_relative_difference']}")
    return out


def evaluate_all(model, eval_docs, lengths, l0, template, searched, args, rows: list, saved) -> list[dict]:
    """Perplexity and passkey of every method at every length, appended to `rows`; `saved()` after each method. A
    failure (an unsupported combination, out of memory) is recorded in its row and the run goes on."""
    from scaled_rope.evaluate import TASK, ByteTokenizer, passkey_accuracy, passkey_prompt, perplexity
    from scaled_rope.integrations.transformers import patch_model, unpatch_model

    tokenizer = ByteTokenizer()
    try:
        passkey_prompt(tokenizer, min(lengths), 12345, 0.5, task=TASK)
        task = TASK
    except ValueError:
        task = None
    max_len = max(lengths)
    docs = [d[:max_len] for d in eval_docs]
    for name in METHODS:
        for length in lengths:
            setting = method_setting(name, length, l0, template, searched, args.dynamic_factor)
            row = {"method": name, "length": length, "scale": length / l0, "perplexity": None, "passkey": None}
            rows.append(row)
            if not setting:
                row["config"] = "not searched"
                continue
            row["config"] = describe(setting)
            try:
                patch_model(model, backend=args.backend, **setting)
                t = time.perf_counter()
                row["perplexity"] = perplexity(model, docs, length=length,
                                               batch_size=max(1, args.tokens_per_batch // length))
                row["perplexity_seconds"] = time.perf_counter() - t
                t = time.perf_counter()
                try:
                    row["passkey"] = passkey_accuracy(model, length=length, trials=args.trials, seed=args.seed,
                                                      tokenizer=tokenizer, task=task, batch_size=args.passkey_batch)
                except ValueError as exc:  # the prompt does not fit at this length
                    row["passkey_error"] = str(exc)
                row["passkey_seconds"] = time.perf_counter() - t
            except Exception as exc:  # noqa: BLE001 - recorded, the other methods still run
                row["error"] = f"{type(exc).__name__}: {exc}"
                say(f"{name:17s} {length:6d}: FAILED {row['error']}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            passkey = "n/a" if row["passkey"] is None else f"{row['passkey']:.2f}"
            say(f"{name:17s} {length:6d}: perplexity {row['perplexity']:10.4f}  passkey {passkey}")
        saved()
    unpatch_model(model)
    return rows


# ---- reporting ------------------------------------------------------------------------------------------------------
def markdown(rows, lengths, l0, searches, throughput, claim, env, meta) -> str:
    lines = [f"Context extension without fine-tuning: byte-level Llama ({meta['parameters'] / 1e6:.1f}M parameters, "
             f"trained at {l0} on the Python {meta['python']} standard library, {meta['steps']} steps; held-out "
             f"perplexity {meta['heldout_perplexity']:.3f} at {l0}); {env.get('gpu') or env['device']}, torch "
             f"{env['torch']}, transformers {env['transformers']}, triton {env.get('triton')}.", "",
             "Perplexity (lower is better) / passkey accuracy, per evaluation length:", "",
             "| method | " + " | ".join(f"{n} ({n // l0}x)" for n in lengths) + " |",
             "|---|" + "---:|" * len(lengths)]
    by = {(r["method"], r["length"]): r for r in rows}
    for name in METHODS:
        cells = []
        for n in lengths:
            r = by.get((name, n))
            if r is None or r.get("perplexity") is None:
                cells.append("failed" if r is not None and r.get("error") else "n/a")
                continue
            pk = "n/a" if r.get("passkey") is None else f"{100 * r['passkey']:.0f}%"
            cells.append(f"{r['perplexity']:.3f} / {pk}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if searches:
        lines += ["", "LongRoPE searches (fitness = perplexity at the target on the search files):", "",
                  "| variant | scale | fitness | seeds PI / NTK / YaRN | n_hat | candidates | generations | seconds | "
                  "candidates/min |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for s in searches:
            if "error" in s:
                lines.append(f"| {s['method']} | {s['scale']}x | failed: {s['error'][:80]} | | | | | | |")
                continue
            seeds = " / ".join(f"{s['seed_fitness'][k]:.4f}" if k in s["seed_fitness"] else "-"
                               for k in ("seed:pi", "seed:ntk", "seed:yarn"))
            lines.append(f"| {s['method']} | {s['scale']}x | {s['fitness']:.4f} | {seeds} | {s['n_hat']} | "
                         f"{s['evaluations']} | "
                         f"{s['generations']}{' (budget)' if s['stopped_early'] else ''} | {s['seconds']:.1f} | "
                         f"{s['candidates_per_minute']:.0f} |")
    if throughput:
        t = throughput
        lines += ["", f"Search throughput at {t['scale']}x ({t['target_length']} tokens): scaled_rope "
                      f"{t['scaled_rope']['candidates_per_minute']:.0f} candidates/min, stock eager rope + SDPA "
                      f"{t['stock']['candidates_per_minute']:.0f} candidates/min ({t['speedup']:.2f}x); fitness of "
                      f"{t['fitness_compared']} common candidates agrees to a relative "
                      f"{t['fitness_max_relative_difference']}."]
    if claim:
        lines += ["", claim["sentence"]]
    return "\n".join(lines) + "\n"


def claim_at(rows, l0, scale: int = 8) -> dict | None:
    length = scale * l0
    by = {r["method"]: r.get("perplexity") for r in rows if r["length"] == length}
    if by.get("longrope") is None:
        return None
    others = {k: by.get(k) for k in ("pi", "ntk", "yarn")}
    beats = all(v is not None and by["longrope"] < v for v in others.values())
    best_lr = min(v for v in (by.get("longrope"), by.get("longrope_no_nhat")) if v is not None)
    best_other = min((v for v in others.values() if v is not None), default=math.nan)
    margin = (best_other - by["longrope"]) / best_other
    sentence = (f"At {scale}x ({length} tokens) the searched LongRoPE factors "
                f"{'beat' if beats else 'do not beat'} PI, NTK and YaRN ({100 * margin:+.2f}% against the best of "
                f"them, positive = LongRoPE lower): LongRoPE {by['longrope']:.3f} "
                f"(without n̂ {by.get('longrope_no_nhat') or float('nan'):.3f}) vs PI {others['pi']:.3f}, NTK "
                f"{others['ntk']:.3f}, YaRN {others['yarn']:.3f}.")
    return {"scale": scale, "length": length, "perplexity": by, "longrope_beats_pi_ntk_yarn": beats,
            "relative_margin": margin,
            "best_longrope": best_lr, "sentence": sentence}


def plot(rows, lengths, path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in METHODS:
        pts = [(r["length"], r["perplexity"], r.get("passkey")) for r in rows
               if r["method"] == name and r.get("perplexity") is not None]
        if not pts:
            continue
        ax1.plot([p[0] for p in pts], [min(p[1], 1e4) for p in pts], marker="o", label=name)
        ax2.plot([p[0] for p in pts if p[2] is not None], [p[2] for p in pts if p[2] is not None], marker="o",
                 label=name)
    for ax, title in ((ax1, "perplexity (capped at 1e4)"), (ax2, "passkey accuracy")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths)
        ax.set_xticklabels([str(n) for n in lengths])
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="directory written by bench/train_byte_model.py")
    parser.add_argument("--out", type=Path, default=None, help="output directory (default bench/results)")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke run (trains a tiny model unless --model)")
    parser.add_argument("--budget-seconds", type=float, default=None,
                        help="time for the searches and throughput runs (default 240, tiny 20)")
    parser.add_argument("--scales", default=None, help="comma-separated multiples of the training context "
                                                       "(default 1,2,4,8,16; tiny 1,2,4)")
    parser.add_argument("--trials", type=int, default=None, help="passkey prompts per length (default 20, tiny 2)")
    parser.add_argument("--docs", type=int, default=None, help="evaluation files (default 8, tiny 1)")
    parser.add_argument("--search-docs", type=int, default=None, help="search files (default 4, tiny 1)")
    parser.add_argument("--dynamic-factor", type=float, default=2.0)
    parser.add_argument("--backend", default=None, help="scaled_rope backend (default auto; tiny: reference)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="resumable search checkpoints here")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args(argv)
    tiny = args.tiny
    args.budget_seconds = args.budget_seconds if args.budget_seconds is not None else (20.0 if tiny else 240.0)
    args.scales = [int(x) for x in (args.scales or ("1,2,4" if tiny else "1,2,4,8,16")).split(",")]
    args.trials = args.trials or (2 if tiny else 20)
    args.docs = args.docs or (1 if tiny else 8)
    args.search_docs = args.search_docs or (1 if tiny else 4)
    args.backend = args.backend or ("reference" if tiny else "auto")
    args.passkey_batch = 8
    if any(s < 1 for s in args.scales) or args.budget_seconds < 0 or args.trials < 1:
        parser.error("--scales must be >= 1, --budget-seconds >= 0 and --trials >= 1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if tiny and device == "cpu":
        torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    env = versions(device)
    say("versions:", ", ".join(f"{k} {v}" for k, v in env.items()))

    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from scaled_rope import RopeScaling

    hf_logging.set_verbosity_error()
    model_dir = args.model
    if model_dir is None:
        if not tiny:
            parser.error("--model is required (train one with bench/train_byte_model.py), or pass --tiny")
        model_dir = Path(tempfile.mkdtemp(prefix="byte-model-tiny-"))
        say(f"training a tiny model into {model_dir}")
        tbm.train(model_dir, tiny=True, device="cpu", quiet=True)
    meta = json.loads((model_dir / "byte_model.json").read_text())
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    l0 = int(meta["context"])
    lengths = [s * l0 for s in args.scales]
    args.tokens_per_batch = max(lengths) * (2 if tiny else 8)
    template = RopeScaling.from_hf_config(model.config)
    say(f"model {model_dir}: {meta['parameters'] / 1e6:.1f}M parameters, context {l0}, {meta['steps']} steps, "
        f"held-out perplexity {meta['heldout_perplexity']:.3f}; lengths {lengths}")

    names = tbm.heldout_documents(meta, max(lengths) + 1)
    need = args.docs + args.search_docs
    if len(names) < 2:
        raise SystemExit(f"only {len(names)} held-out files have >= {max(lengths) + 1} bytes; lower --scales")
    search_names, eval_names = names[0::2][:args.search_docs], names[1::2][:args.docs]
    if len(search_names) + len(eval_names) < need:
        say(f"note: {len(names)} long held-out files: {len(search_names)} for the search, {len(eval_names)} for "
            f"evaluation")
    search_docs = [tbm.document(n) for n in search_names]
    eval_docs = [tbm.document(n) for n in eval_names]

    # sanity: the patched model with its own rope reproduces stock transformers at the training context
    from scaled_rope.evaluate import perplexity
    from scaled_rope.integrations.transformers import patch_model, unpatch_model

    check_docs = [d[:l0] for d in eval_docs]
    stock_ppl = perplexity(model, check_docs, length=l0, batch_size=len(check_docs))
    patch_model(model, backend=args.backend)
    ours_ppl = perplexity(model, check_docs, length=l0, batch_size=len(check_docs))
    unpatch_model(model)
    say(f"check at {l0}: stock {stock_ppl:.5f}, patched {ours_ppl:.5f}")

    payload = {"date": today(), "env": env, "model": {k: v for k, v in meta.items() if k != "heldout_files"},
               "model_dir": str(model_dir), "settings": {k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in vars(args).items()},
               "search_files": search_names, "eval_files": eval_names, "lengths": lengths,
               "check": {"length": l0, "stock_perplexity": stock_ppl, "patched_perplexity": ours_ppl},
               "results": [], "searches": [], "throughput": None, "claim": None, "complete": False}
    device_name = env.get("gpu") or "cpu"

    def saved() -> Path:  # the JSON is rewritten after every phase, so a run cut short still leaves its numbers
        payload["seconds"] = time.perf_counter() - START
        return write_results(args.out, "extension", device_name, payload, suffix="-tiny" if tiny else "")

    search_budget = args.budget_seconds * (0.5 if not args.skip_throughput else 0.7)
    searched, payload["searches"] = run_searches(model, search_docs, args.scales, l0, args, search_budget)
    saved()
    if not args.skip_throughput and any(s > 1 for s in args.scales):
        try:
            payload["throughput"] = run_throughput(model, search_docs, args.scales, l0, args, args.budget_seconds / 6)
        except Exception as exc:  # noqa: BLE001 - recorded; the evaluations still run
            payload["throughput"] = {"error": f"{type(exc).__name__}: {exc}"}
            say(f"throughput: FAILED {payload['throughput']['error']}")
        saved()
    rows = evaluate_all(model, eval_docs, lengths, l0, template, searched, args, payload["results"], saved)
    claim = payload["claim"] = claim_at(rows, l0, 8 if 8 in args.scales else max(args.scales))
    payload["complete"] = True
    path = saved()
    throughput = payload["throughput"] if payload["throughput"] and "error" not in payload["throughput"] else None
    table = markdown(rows, lengths, l0, payload["searches"], throughput, claim, env, meta)
    path.with_suffix(".md").write_text(table)
    note = plot(rows, lengths, path.with_suffix(".png"))
    print()
    print(table)
    say(f"wrote {path}, {path.with_suffix('.md')}" + (f"; {note}" if note else f", {path.with_suffix('.png')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
