"""The benchmarks keep CPU runs out of the README's GPU tables, and the main job's CPU check fails a wrong kernel."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import _results  # noqa: E402
import results_table  # noqa: E402

CPU_ENV = {"device": "CPU (x86_64)", "torch": "2.13.0+cpu", "triton": "3.6.0", "cuda": None, "interpreter": True}


def test_committed_results_are_gpu_runs_and_cpu_runs_are_not():
    files = sorted((BENCH / "results").glob("*.json"))
    assert files
    for path in files:
        assert _results.is_gpu_run(json.loads(path.read_text())), f"{path.name} is not a GPU run"
    assert not _results.is_gpu_run({"env": CPU_ENV})
    # a CUDA build of torch on a machine without a GPU (bench_model's CPU smoke run) is still not a GPU run
    assert not _results.is_gpu_run({"env": {"gpu": "none (CPU smoke test)", "cuda": "13.0"}})
    assert not _results.is_gpu_run({"env": {"device": "NVIDIA H100 80GB HBM3", "cuda": "13.0", "interpreter": True}})
    assert not _results.is_gpu_run({})


def test_cpu_runs_are_written_beside_not_into_the_results(tmp_path, monkeypatch):
    monkeypatch.setattr(_results, "RESULTS", tmp_path)
    monkeypatch.setattr(_results, "CPU_RESULTS", tmp_path / "cpu")
    cpu = _results.write_results(None, "attention", "CPU (x86_64)", {"date": "2026-12-04", "env": CPU_ENV})
    assert cpu.parent == tmp_path / "cpu" and (tmp_path / "cpu" / ".gitignore").read_text().strip().endswith("*")
    gpu_env = {"device": "NVIDIA H200", "cuda": "13.0", "interpreter": False}
    gpu = _results.write_results(None, "attention", "NVIDIA H200", {"date": "2026-12-04", "env": gpu_env})
    assert gpu == tmp_path / "attention-2026-12-04-nvidia-h200.json"
    explicit = _results.write_results(tmp_path / "x.json", "attention", "CPU", {"env": CPU_ENV})
    assert explicit == tmp_path / "x.json"  # --out is honoured as given


def test_results_table_skips_non_gpu_json(tmp_path, monkeypatch, capsys):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    source = sorted((BENCH / "results").glob("attention-*.json"))[0]
    shutil.copy(source, results / source.name)
    cpu = json.loads(source.read_text())
    cpu["env"] = CPU_ENV
    cpu["date"] = "2099-01-01"  # newest, so it would lead the tables if it were read
    (results / "attention-2099-01-01-cpu-x86-64.json").write_text(json.dumps(cpu))
    (results / "decode-2099-01-01-cpu.json").write_text(json.dumps({"env": CPU_ENV, "results": []}))
    monkeypatch.setattr(results_table, "ROOT", tmp_path)
    monkeypatch.setattr(results_table, "RESULTS", results)
    text = results_table.build()
    assert source.name in text
    assert "2099" not in text and "CPU" not in text
    assert results_table.newest("decode") is None
    assert "skipping bench/results/attention-2099-01-01-cpu-x86-64.json: not a GPU run" in capsys.readouterr().err


def test_main_job_cpu_check_fails_a_wrong_kernel():
    import bench_attention

    case = bench_attention.Case("longrope", 1, 2, 24, 32, "cpu", torch.float32)
    impls = bench_attention.implementations(case)
    exact = impls["reference"]  # the reference itself, in float32: within the rule
    impls["ours"] = exact
    assert all(v["ok"] for v in bench_attention.cpu_check(case, impls, backward=True))
    impls["ours"] = lambda q, k, v: exact(q, k, v) * (1 + 1e-5)  # off by 10 float32 ulps
    verdicts = bench_attention.cpu_check(case, impls, backward=True)
    assert [v["tensor"] for v in verdicts] == ["out", "dq", "dk", "dv"]
    assert not any(v["ok"] for v in verdicts)
    assert "FAIL" in bench_attention.verdict_table(verdicts)

    def broken(q, k, v):
        raise RuntimeError("kernel failed")

    impls["ours"] = broken
    assert [v["ok"] for v in bench_attention.cpu_check(case, impls, backward=False)] == [False]


def test_pending_kernel_patches_still_apply():
    """bench/pending holds kernel changes written without a GPU to run them (bench/NOTES.md says what each awaits):
    each must still apply to the tree, so that a change to its files is made with the patch in view."""
    import subprocess

    root = BENCH.parent
    if shutil.which("git") is None or not (root / ".git").exists():
        import pytest
        pytest.skip("needs git and a git checkout")
    patches = sorted((BENCH / "pending").glob("*.patch"))
    for patch in patches:
        result = subprocess.run(["git", "apply", "--check", str(patch)], cwd=root, capture_output=True, text=True)
        assert result.returncode == 0, f"{patch.name} no longer applies: {result.stderr.strip()}"
