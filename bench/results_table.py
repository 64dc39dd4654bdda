"""Regenerate the README's results section from the JSON files in bench/results/.

    python bench/results_table.py          # rewrites the block between the README's results markers
    python bench/results_table.py --print  # prints it instead

Attention: every full run in full, newest first; --quick subsets and runs superseded the same day (files named
-quick / -before-...) as one line each. Other families (decode, model, rope): the newest file. Each
table names its file, GPU and versions, so every number in the README traces back to one measured run.
Only GPU runs are read: a JSON measured on a CPU or in Triton's interpreter (`_results.is_gpu_run` is False) is
skipped with a note on stderr, and bench/results/cpu/, where the benchmarks put such runs, is not read at all.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _results import is_gpu_run

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def gpu_results(prefix: str) -> list[Path]:
    """bench/results/<prefix>-*.json measured on a GPU; any other JSON there is skipped with a note on stderr."""
    files = []
    for path in sorted(RESULTS.glob(f"{prefix}-*.json")):
        if is_gpu_run(json.loads(path.read_text())):
            files.append(path)
        else:
            print(f"results_table: skipping {path.relative_to(ROOT)}: not a GPU run", file=sys.stderr)
    return files


def newest(prefix: str) -> Path | None:
    files = sorted(gpu_results(prefix), key=lambda p: (json.loads(p.read_text()).get("date", ""),
                                                       "quick" not in p.name, p.name))
    return files[-1] if files else None


def env_line(path: Path, data: dict) -> str:
    env = data.get("env", {})
    parts = [env.get("device") or env.get("gpu"), f"torch {env.get('torch')}", f"triton {env.get('triton')}",
             f"CUDA {env.get('cuda') or env.get('cuda_torch')}"]
    return f"`{path.relative_to(ROOT)}` ({data.get('date')}; " + ", ".join(str(p) for p in parts if p) + ")"


def attention_table(path: Path) -> list[str]:
    data = json.loads(path.read_text())
    rows = data["results"]
    version = f"{data['kernel_version']}, " if data.get("kernel_version") else ""
    lines = [f"Attention, causal bf16, TFLOP/s (rope FLOPs not counted) — {version}{env_line(path, data)}:", "",
             "| case | pass | ours ms | ours TFLOP/s | peer | peer ms | ours vs peer |", "|---|---|---:|---:|---|---:|---:|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        for direction in ("fwd", "fwd+bwd"):
            group = [r for r in rows if r["case"] == case and r["direction"] == direction and r.get("ms")]
            ours = next((r for r in group if r["impl"] == "ours"), None)
            if ours is None:
                continue
            for peer in group:
                if peer is ours:
                    continue
                lines.append(f"| {case} | {direction} | {ours['ms']:.3f} | {ours['tflops']:.0f} | {peer['impl']} | "
                             f"{peer['ms']:.3f} | {peer['ms'] / ours['ms']:.2f}x |")
    return lines


COLUMNS = {
    "decode": ("shape", "method", "ms", "tbps"),
    "model": ("model", "prompt", "impl", "prefill_ms", "decode_ms_per_token", "same_next_token",
              "max_abs_logit_diff"),
    "rope": ("shape", "method", "ms", "gbps"),
    "cuda-forward": ("case", "backend", "ms", "tflops"),
}


def _number(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def generic_table(path: Path, title: str, columns: tuple[str, ...]) -> list[str]:
    data = json.loads(path.read_text())
    rows = [r for r in data.get("results", []) if all(r.get(c) is not None for c in columns)]
    if not rows:
        return []
    lines = [f"{title} — {env_line(path, data)}:", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [_number(row[c]) if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def extension_table(path: Path) -> list[str]:
    """Perplexity / passkey accuracy per method and length of a bench_extension run, and its 8x verdict."""
    data = json.loads(path.read_text())
    lengths = data.get("lengths", [])
    cells = {(r["method"], r["length"]): r for r in data.get("results", [])}
    methods = list(dict.fromkeys(r["method"] for r in data.get("results", [])))
    if not methods:
        return []
    model = data.get("model", {})
    lines = [f"Context extension without fine-tuning (perplexity / passkey accuracy), byte-level model of "
             f"{model.get('parameters', 0) / 1e6:.1f}M parameters trained at {model.get('context')} — "
             f"{env_line(path, data)}:", "",
             "| method | " + " | ".join(str(n) for n in lengths) + " |", "|---|" + "---:|" * len(lengths)]
    for method in methods:
        row = [cells.get((method, n)) for n in lengths]
        lines.append(f"| {method} | " + " | ".join(
            "n/a" if r is None else f"{r['perplexity']:.3f} / {r['passkey']:.0%}" for r in row) + " |")
    claim = data.get("claim") or {}
    if claim.get("sentence"):
        lines += ["", claim["sentence"]]
    return lines


def build() -> str:
    blocks = []
    attention = sorted(gpu_results("attention"), key=lambda p: (json.loads(p.read_text()).get("date", ""), p.name),
                       reverse=True)
    current = [p for p in attention if "-quick" not in p.name and "-before-" not in p.name]
    for path in current:  # full runs, newest first: each with every peer it met
        blocks.append(attention_table(path))
    earlier = [p for p in attention if p not in current]
    if earlier:  # subsets (--quick) and runs superseded within a day (-before-...): one line each
        lines = ["Earlier attention runs (tables in the files; the kernel history in bench/NOTES.md):", ""]
        for path in earlier:
            data = json.loads(path.read_text())
            lines.append(f"- `{path.relative_to(ROOT)}`: {data.get('kernel_version') or 'unlabelled'} "
                         f"({data.get('date')}, {data.get('env', {}).get('device')})")
        blocks.append(lines)
    # the CUDA forward is timed beside ours in the attention runs ("ours (cuda)"); cuda-forward-*.json files hold
    # the earlier kernel versions (bench/NOTES.md)
    for prefix, title in (("decode", "Decode over an unrotated KV cache"), ("model", "End-to-end model"),
                          ("rope", "Standalone rotation")):
        if (path := newest(prefix)) is not None:
            blocks.append(generic_table(path, title, COLUMNS[prefix]))
    if (path := newest("extension")) is not None:
        blocks.append(extension_table(path))
    return "\n\n".join("\n".join(b) for b in blocks if b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--print", action="store_true")
    args = parser.parse_args()
    text = build()
    if args.print:
        print(text)
        return 0
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content or END not in content:
        print(f"README.md has no {START} ... {END} block", file=sys.stderr)
        return 1
    head, rest = content.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
