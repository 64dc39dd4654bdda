"""Where the benchmarks write their JSON: <out>/<family>-<date>-<device slug>[<suffix>].json (or `out` itself
when it names a .json file). Shared by every bench/*.py script."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def today() -> str:
    return datetime.date.today().isoformat()


def write_results(out: Path | None, family: str, device: str, payload: dict, suffix: str = "") -> Path:
    path = RESULTS if out is None else Path(out)
    if path.suffix != ".json":
        slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
        path = path / f"{family}-{payload.get('date', today())}-{slug}{suffix}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))
    return path
