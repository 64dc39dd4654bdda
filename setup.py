"""Build scaled-rope: the Python package, and scaled_rope._C from csrc/ with nvcc when nvcc is found.

The extension is torch-free (pybind11 binding that takes integers), compiled and linked by nvcc against the
static CUDA runtime. Environment:
  SCALED_ROPE_CUDA_ARCHS  ';'-separated architectures, default "80;90a"; "NN+PTX" also embeds PTX for NN
  SCALED_ROPE_SKIP_CUDA=1 install without _C
  MAX_JOBS                parallel compile jobs (default: CPU count)
  CUDA_HOME / CUDA_PATH   where to look for bin/nvcc before PATH and /usr/local/cuda
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "80;90a"


def find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidate = Path(os.environ[var]) / "bin" / "nvcc"
            if candidate.is_file():
                return str(candidate)
    found = shutil.which("nvcc")
    if found:
        return found
    candidate = Path("/usr/local/cuda/bin/nvcc")
    return str(candidate) if candidate.is_file() else None


def gencode_flags(archs):
    """'80;90a+PTX' -> ['-gencode=arch=compute_80,code=sm_80', '-gencode=arch=compute_90a,code=[sm_90a,compute_90a]']"""
    flags = []
    for item in archs.replace(",", ";").split(";"):
        item = item.strip()
        if not item:
            continue
        match = re.fullmatch(r"(?:sm_|compute_)?(\d+[af]?)(\+PTX)?", item, flags=re.IGNORECASE)
        if match is None:
            raise ValueError(f"SCALED_ROPE_CUDA_ARCHS: cannot parse {item!r} (expected e.g. '80;90a' or '90a+PTX')")
        arch = match.group(1).lower()
        code = f"[sm_{arch},compute_{arch}]" if match.group(2) else f"sm_{arch}"
        flags.append(f"-gencode=arch=compute_{arch},code={code}")
    if not flags:
        raise ValueError("SCALED_ROPE_CUDA_ARCHS is empty; set SCALED_ROPE_SKIP_CUDA=1 to skip the CUDA build")
    return flags


class NvccBuildExt(build_ext):
    """Compiles each source of an extension with nvcc (through ninja when available) and links with nvcc."""

    def build_extension(self, ext):
        import pybind11

        nvcc = ext.nvcc
        archs = os.environ.get("SCALED_ROPE_CUDA_ARCHS", DEFAULT_ARCHS)
        gencode = gencode_flags(archs)
        jobs = int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1)
        includes = [ROOT / "csrc", pybind11.get_include(), sysconfig.get_paths()["include"]]
        cflags = [
            "-O3", "-std=c++17", "-lineinfo", f"--threads={min(len(gencode), jobs)}",
            "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden",
            f'-DSCALED_ROPE_CUDA_ARCHS="{archs}"',
            *gencode, *(f"-I{path}" for path in includes),
        ]
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        temp = Path(self.build_temp).resolve() / "csrc"
        temp.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        sources = [ROOT / src for src in ext.sources]
        objects = [temp / f"{src.name}.o" for src in sources]
        link = [nvcc, "-shared", "-cudart", "static", *map(str, objects), "-o", str(target),
                "-ldl", "-lrt", "-lpthread"]

        ninja = shutil.which("ninja")
        if ninja:
            self._ninja(ninja, jobs, nvcc, cflags, sources, objects, link, temp)
        else:
            def compile_one(pair):
                subprocess.run([nvcc, *cflags, "-c", str(pair[0]), "-o", str(pair[1])], check=True)

            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(compile_one, zip(sources, objects)))
            subprocess.run(link, check=True)

    @staticmethod
    def _ninja(ninja, jobs, nvcc, cflags, sources, objects, link, temp):
        quote = lambda args: " ".join(shlex.quote(str(a)) for a in args)  # noqa: E731
        lines = [
            "ninja_required_version = 1.3",
            f"rule nvcc\n  command = {quote([nvcc, *cflags])} -MD -MF $out.d -c $in -o $out\n"
            "  depfile = $out.d\n  deps = gcc",
            f"rule link\n  command = {quote(link)}",
        ]
        lines += [f"build {shlex.quote(str(o))}: nvcc {shlex.quote(str(s))}" for s, o in zip(sources, objects)]
        lines.append(f"build {shlex.quote(link[link.index('-o') + 1])}: link {quote(objects)}")
        (temp / "build.ninja").write_text("\n".join(lines) + "\n")
        subprocess.run([ninja, "-C", str(temp), "-j", str(jobs)], check=True)


def cuda_extensions():
    if os.environ.get("SCALED_ROPE_SKIP_CUDA", "0") not in ("", "0"):
        print("scaled-rope: SCALED_ROPE_SKIP_CUDA is set; installing without the CUDA extension _C", file=sys.stderr)
        return []
    nvcc = find_nvcc()
    if nvcc is None:
        print("scaled-rope: nvcc not found; installing without the CUDA extension _C", file=sys.stderr)
        return []
    sources = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").glob("*.cu"))
    ext = Extension("scaled_rope._C", sources=[*sources, "csrc/binding.cpp"])
    ext.nvcc = nvcc
    return [ext]


setup(
    package_dir={
        "scaled_rope": "python/scaled_rope",
        "scaled_rope.triton_kernels": "triton_kernels",
        "scaled_rope.integrations": "python/scaled_rope/integrations",
    },
    packages=["scaled_rope", "scaled_rope.triton_kernels", "scaled_rope.integrations"],
    ext_modules=cuda_extensions(),
    cmdclass={"build_ext": NvccBuildExt},
)
