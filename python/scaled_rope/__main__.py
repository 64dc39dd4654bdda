"""`python -m scaled_rope`: what this installation can do.

Prints versions (scaled_rope, Python, torch, triton, transformers, CUDA), the GPU and its compute capability,
which backends load here and why not, the CUDA architectures scaled_rope._C was compiled for, and the backend that
`backend="auto"` picks for a typical call. Every probe is guarded: on a CPU-only machine, without triton or without
the compiled extension, the report says so instead of failing. Exit status 0 unless the report itself breaks.
"""
from __future__ import annotations

import importlib
import os
import pkgutil
import platform
import sys
from importlib import metadata

# a typical call: one Llama-like layer, (batch, seqlen, heads, head_dim)
TYPICAL_SHAPE = (1, 1024, 32, 128)


def _version(dist: str, module: str | None = None) -> str:
    """Installed version of a distribution, or why there is none (never raises)."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        pass
    if module is not None:
        try:
            return getattr(importlib.import_module(module), "__version__", "unknown version")
        except Exception as exc:  # noqa: BLE001 - the report names any failure
            return f"not installed ({type(exc).__name__}: {exc})"
    return "not installed"


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0][:200]


def _arch_runs_on(arch: str, capability: tuple[int, int]) -> bool:
    """Whether SASS built for `arch` ("80", "sm_90a", "86+ptx") runs on a device of this compute capability:
    same major and a minor at least as high; an arch-specific target ("90a") only on that exact capability;
    PTX ("+ptx") is JIT-compiled for any capability at least as high."""
    arch = arch.strip().lower().removeprefix("sm_").removeprefix("compute_")
    ptx = arch.endswith("+ptx")
    arch = arch.removesuffix("+ptx")
    specific = arch.endswith("a")
    digits = arch.rstrip("af")
    if not digits.isdigit() or len(digits) < 2:
        return False
    major, minor = int(digits[:-1]), int(digits[-1])
    if specific:
        return capability == (major, minor)
    if ptx:
        return capability >= (major, minor)
    return capability[0] == major and capability[1] >= minor


def report() -> list[str]:
    lines: list[str] = []
    add = lines.append

    # ---- versions -------------------------------------------------------------------------------------------
    try:
        import scaled_rope

        add(f"scaled_rope   {scaled_rope.__version__} ({os.path.dirname(scaled_rope.__file__)})")
    except Exception as exc:  # noqa: BLE001
        add(f"scaled_rope   import failed: {_one_line(exc)}")
        return lines
    add(f"python        {platform.python_version()} ({sys.executable})")
    add(f"platform      {platform.platform()}")
    import torch

    add(f"torch         {torch.__version__} (CUDA runtime {torch.version.cuda})" if torch.version.cuda
        else f"torch         {torch.__version__} (CPU build: no CUDA)")
    triton_version = _version("triton", "triton")
    add(f"triton        {triton_version}")
    add(f"transformers  {_version('transformers')}")

    # ---- GPU ------------------------------------------------------------------------------------------------
    capability = None
    gpu = None
    try:
        if torch.cuda.is_available():
            gpu = torch.device("cuda", torch.cuda.current_device())
            capability = torch.cuda.get_device_capability(gpu)
            add(f"GPU           {torch.cuda.get_device_name(gpu)}, compute capability {capability[0]}.{capability[1]} "
                f"(sm_{capability[0]}{capability[1]}); {torch.cuda.device_count()} visible")
        else:
            add("GPU           none (torch.cuda.is_available() is False)")
    except Exception as exc:  # noqa: BLE001 - a broken driver is reported, not raised
        add(f"GPU           probe failed: {_one_line(exc)}")
        gpu = None
    switches = {k: v for k, v in sorted(os.environ.items())
                if k.startswith("SCALED_ROPE_") or k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    add("environment   " + (", ".join(f"{k}={v}" for k, v in switches.items()) or "no SCALED_ROPE_* / TRITON_INTERPRET "
                             "switches set"))

    # ---- backends -------------------------------------------------------------------------------------------
    add("")
    add("backends")
    add("  reference   loads: plain PyTorch, any device and float dtype (scaled_rope.reference)")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if triton_version.startswith("not installed"):
        add("  triton      does not load: triton is not installed (pip install triton; Linux only)")
    else:
        try:
            importlib.import_module("triton")
            kernels = importlib.import_module("scaled_rope.triton_kernels")
            for module in pkgutil.iter_modules(kernels.__path__):  # the kernel modules define their jit functions
                if not module.name.startswith("_"):
                    importlib.import_module(f"scaled_rope.triton_kernels.{module.name}")
            if gpu is not None:
                add(f"  triton      loads: triton {triton_version}, kernels compile for "
                    f"{torch.cuda.get_device_name(gpu)}")
            elif interpreting:
                add("  triton      loads: no GPU, so the kernels run in Triton's interpreter (TRITON_INTERPRET=1): "
                    "correct but slow, for tests")
            else:
                add("  triton      loads, but no GPU: it runs CPU tensors only under TRITON_INTERPRET=1 (tests)")
        except Exception as exc:  # noqa: BLE001
            add(f"  triton      does not load: {_one_line(exc)}")
    try:
        ext = importlib.import_module("scaled_rope._C")
    except Exception as exc:  # noqa: BLE001
        ext = None
        add(f"  cuda        does not load: scaled_rope._C is not built ({_one_line(exc)}); reinstall with nvcc on "
            "PATH and without SCALED_ROPE_SKIP_CUDA=1 to build it")
    if ext is not None:
        archs = ext.compiled_archs() if hasattr(ext, "compiled_archs") else "unknown"
        built_with = ""
        if hasattr(ext, "cuda_version"):
            try:
                v = int(ext.cuda_version())
                built_with = f", CUDA runtime {v // 1000}.{v % 1000 // 10}"
            except Exception as exc:  # noqa: BLE001
                built_with = f", CUDA runtime unknown ({_one_line(exc)})"
        where = f"scaled_rope._C built for {archs}{built_with}"
        if capability is None:
            add(f"  cuda        {where}; no GPU here to run it")
        else:
            fits = [a for a in archs.replace(",", ";").split(";") if a.strip() and _arch_runs_on(a, capability)]
            if fits:
                add(f"  cuda        loads: {where}; sm_{capability[0]}{capability[1]} runs {', '.join(fits)}")
            else:
                add(f"  cuda        {where}: none of these runs on sm_{capability[0]}{capability[1]}; rebuild "
                    f"with SCALED_ROPE_CUDA_ARCHS including {capability[0]}{capability[1]}")

    # ---- what "auto" picks ----------------------------------------------------------------------------------
    add("")
    shape = "x".join(str(s) for s in TYPICAL_SHAPE)
    add(f'backend="auto" for q of shape {shape} (batch, seqlen, heads, head_dim)')
    probes = []
    if gpu is not None:
        probes.append((gpu, torch.bfloat16))
    probes.append((torch.device("cpu"), torch.float32))
    for device, dtype in probes:
        try:
            q = torch.empty(TYPICAL_SHAPE, device=device, dtype=dtype)
        except Exception as exc:  # noqa: BLE001
            add(f"  {device} {dtype}: could not make a probe tensor ({_one_line(exc)})")
            continue
        for needs_grad in (False, True):
            use = "training" if needs_grad else "inference"
            label = f"  {str(device):6} {str(dtype).removeprefix('torch.'):8} {use}"
            try:
                try:
                    name, passed = scaled_rope.explain_backend(q, needs_grad=needs_grad)
                except TypeError:  # an explain_backend without needs_grad
                    if needs_grad:
                        continue
                    name, passed = scaled_rope.explain_backend(q)
            except Exception as exc:  # noqa: BLE001
                add(f"{label}: explain_backend failed ({_one_line(exc)})")
                continue
            add(f"{label}: {name}")
            for other, why in dict(passed).items():
                add(f"      not {other}: {why}")
    return lines


def main() -> int:
    print("\n".join(report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
