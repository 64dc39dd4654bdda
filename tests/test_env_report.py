"""`python -m scaled_rope`: the environment report states versions, GPU, backends and the "auto" choice, and it
keeps going when a piece (triton, the compiled extension, a GPU) is missing."""
from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import scaled_rope
from scaled_rope import __main__ as env_report


def test_module_runs_and_reports_this_installation(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scaled_rope"], capture_output=True, text=True, cwd=tmp_path,
                            env=dict(os.environ), timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert f"scaled_rope   {scaled_rope.__version__}" in text
    assert f"torch         {torch.__version__}" in text
    if importlib.util.find_spec("triton") is not None:
        import triton

        assert f"triton        {triton.__version__}" in text
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        assert torch.cuda.get_device_name() in text and f"compute capability {major}.{minor}" in text
    else:
        assert "GPU           none" in text
    for backend in ("reference", "triton", "cuda"):
        assert f"\n  {backend:<11} " in text, f"no line for the {backend} backend"
    if importlib.util.find_spec("scaled_rope._C") is None:
        assert "scaled_rope._C is not built" in text
    else:
        ext = importlib.import_module("scaled_rope._C")
        assert "scaled_rope._C built for " + ext.compiled_archs() in text
    # the "auto" line for a CPU float32 call names what explain_backend says in the same environment
    q = torch.empty(env_report.TYPICAL_SHAPE, dtype=torch.float32)
    chosen, passed_over = scaled_rope.explain_backend(q)
    assert f"cpu    float32  inference: {chosen}\n" in text
    for name, why in passed_over.items():
        assert f"not {name}: {why}" in text


def test_report_without_triton_says_why(tmp_path):
    """Where triton is not installed (it is a Linux-only dependency) scaled_rope still imports, the report
    completes, says that the Triton backend does not load and names the reference as what "auto" takes on CPU."""
    blocked = ("import runpy, sys; sys.modules['triton'] = None; "  # `import triton` now raises ImportError
               "runpy.run_module('scaled_rope', run_name='__main__', alter_sys=True)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, cwd=tmp_path, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "triton      does not load" in text
    assert "cpu    float32  inference: reference\n" in text
    assert "      not triton: " in text


@pytest.mark.parametrize("arch,capability,runs", [
    ("80", (8, 0), True), ("80", (8, 6), True), ("sm_80", (8, 9), True), ("80", (9, 0), False),
    ("86", (8, 0), False), ("90a", (9, 0), True), ("90a", (10, 0), False), ("sm_90a", (9, 0), True),
    ("80+PTX", (9, 0), True), ("90+ptx", (8, 9), False), ("100f", (10, 3), True), ("", (9, 0), False),
])
def test_which_compiled_architectures_run_on_a_device(arch, capability, runs):
    assert env_report._arch_runs_on(arch, capability) is runs
