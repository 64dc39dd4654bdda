"""Every Python block of README.md runs as written, and the README's two commands are the ones CI runs.

Each ```python block runs on its own in a fresh interpreter (a reader pastes one block, not the whole file),
with TRITON_INTERPRET unset as on a user's CPU machine (backend "auto" then takes the reference there) and
HF_HUB_OFFLINE=1 so that an unmarked block that reaches for the hub fails instead of downloading. A block that
needs more is marked by an HTML comment on the line before its fence:

    <!-- readme-test: gpu -->         runs only where torch sees a CUDA GPU
    <!-- readme-test: download -->    runs only with SCALED_ROPE_README_DOWNLOADS=1 (weights from the hub)

(words combine: `gpu download`). A block that imports a package that is not installed (transformers) is skipped
with that reason. Marked blocks that cannot run here are still compiled, so a syntax error fails everywhere.
"""
from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:\s*([a-z ,-]*?)\s*-->")
FENCE = re.compile(r"^```(\w*)\s*$")
KNOWN_MARKS = {"gpu", "download"}


def fenced_blocks(text: str) -> list[tuple[str, str, set[str], int]]:
    """(language, code, marks, line number of the opening fence) for every fenced block, in order."""
    lines = text.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        start = i
        end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
        assert end is not None, f"README.md:{start + 1}: code fence never closed"
        marks: set[str] = set()
        previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if (found := MARKER.fullmatch(previous.strip())) is not None:
            marks = set(found.group(1).replace(",", " ").split())
        blocks.append((match.group(1), "\n".join(lines[start + 1:end]) + "\n", marks, start + 1))
        i = end + 1
    return blocks


BLOCKS = fenced_blocks(README.read_text())
PYTHON = [(code, marks, line) for lang, code, marks, line in BLOCKS if lang == "python"]


def imported_roots(code: str) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_fenced_blocks_parser():
    """The parser finds blocks, their languages and the marker line above a fence (blank lines between allowed)."""
    text = ("intro\n```bash\necho hi\n```\n<!-- readme-test: gpu download -->\n\n```python\nx = 1\n```\n"
            "```python\ny = 2\n```\n")
    assert fenced_blocks(text) == [("bash", "echo hi\n", set(), 2), ("python", "x = 1\n", {"gpu", "download"}, 7),
                                   ("python", "y = 2\n", set(), 10)]


def test_readme_blocks_are_found_and_marked_with_known_words():
    assert len(PYTHON) >= 4, "README.md should show usage, a model config, a transformers model and decode"
    for _, marks, line in PYTHON:
        assert marks <= KNOWN_MARKS, f"README.md:{line}: unknown readme-test marks {marks - KNOWN_MARKS}"
    unmarked = [code for code, marks, _ in PYTHON if not marks]
    assert len(unmarked) >= 3, "most README blocks must run on any machine"


def test_longrope_factor_count_is_stated_and_shown():
    text = README.read_text()
    assert "rotary_dim / 2" in text
    assert any("RopeScaling.longrope(" in code and "short_factors" in code for code, _, _ in PYTHON)
    assert any("RopeScaling.from_hf_config(" in code for code, _, _ in PYTHON)


def test_the_two_commands_open_the_readme_and_ci_runs_the_test_command():
    lang, code, _, _ = BLOCKS[0]
    assert lang == "bash", "the README's first code block holds the two commands"
    commands = [line.split("#")[0].strip() for line in code.splitlines() if line.strip()]
    assert len(commands) == 2, commands
    main_job, tests = commands
    assert main_job.endswith("python bench/bench_attention.py"), main_job
    assert tests.endswith("pytest"), tests
    # .ci/run calls the test command; it may add checks between the install and pytest, nothing else
    first, last = tests.split(" && ")[0], tests.split(" && ")[-1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    calls = [line for line in ci if line.startswith(first + " && ") and line.split(" && ")[-1].strip() == last]
    assert calls, f".ci/run never runs the README's test command {tests!r}"


def _run_block(code: str, line: int, marks: set[str], cwd: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SCALED_ROPE_POISON")}
    if "download" not in marks:
        env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, f"README.md block at line {line} failed:\n{result.stderr[-4000:]}"


@pytest.mark.parametrize("code,marks,line", PYTHON, ids=[f"line{line}" for _, _, line in PYTHON])
def test_readme_python_block_runs(code, marks, line, tmp_path):
    compile(code, f"README.md:{line}", "exec")
    if "gpu" in marks and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if "download" in marks and os.environ.get("SCALED_ROPE_README_DOWNLOADS") != "1":
        pytest.skip("downloads weights from the hub; set SCALED_ROPE_README_DOWNLOADS=1 to run it")
    missing = sorted(m for m in imported_roots(code) if importlib.util.find_spec(m) is None)
    if missing:
        pytest.skip(f"needs {', '.join(missing)}")
    _run_block(code, line, marks, tmp_path)
