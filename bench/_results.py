"""Where the benchmarks write their JSON: <out>/<family>-<date>-<device slug>[<suffix>].json (or `out` itself
when it names a .json file). Shared by every bench/*.py script.

Only GPU measurements go to bench/results/ by default, where bench/results_table.py turns them into the README's
tables. A run without a GPU (a CPU pass, Triton's interpreter) goes to bench/results/cpu/ instead, a folder that
git and results_table.py both ignore, so a CPU run can never show up in the GPU tables.
"""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CPU_RESULTS = RESULTS / "cpu"


def today() -> str:
    return datetime.date.today().isoformat()


def is_gpu_run(payload: dict) -> bool:
    """True when a results payload was measured on a GPU: its env names a device that is not a CPU, records the
    CUDA version, and the Triton interpreter was not in use."""
    env = payload.get("env") or {}
    if env.get("interpreter"):
        return False
    name = str(env.get("device") or env.get("gpu") or "").strip().lower()
    if not name or name.startswith(("cpu", "none")):
        return False
    return bool(env.get("cuda") or env.get("cuda_torch"))


def write_results(out: Path | None, family: str, device: str, payload: dict, suffix: str = "") -> Path:
    if out is not None:
        path = Path(out)
    elif is_gpu_run(payload):
        path = RESULTS
    else:
        path = CPU_RESULTS
        path.mkdir(parents=True, exist_ok=True)
        (path / ".gitignore").write_text("# CPU and interpreter runs: local only, never in the README tables\n*\n")
    if path.suffix != ".json":
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
        path = path / f"{family}-{payload.get('date', today())}-{slug}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
