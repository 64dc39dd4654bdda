"""Build scaled-rope. (Minimal bootstrap; the CUDA extension build is added in csrc/.)"""
from setuptools import setup

setup(
    name="scaled-rope",
    version="0.1.0",
    package_dir={"scaled_rope": "python/scaled_rope", "scaled_rope.triton_kernels": "triton_kernels"},
    packages=["scaled_rope", "scaled_rope.triton_kernels", "scaled_rope.integrations"],
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy"],
    extras_require={"test": ["pytest"], "triton": ["triton"]},
)
