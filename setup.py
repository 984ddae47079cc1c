"""Build of grpo_fast: the package, the Triton kernels (kernels/) as grpo_fast.kernels, and grpo_fast._C.

Metadata lives in pyproject.toml. Sources and flags of the extension come from csrc/sources.txt and
csrc/flags.txt, which CMakeLists.txt reads too. Install with ``pip install --no-build-isolation -e .``
(the extension builds against the torch already installed).

Environment: GRPO_FAST_NO_CUDA=1 skips the CUDA kernels; TORCH_CUDA_ARCH_LIST replaces the ``arch``
flags; CUDA_HOME / CUDA_PATH point at the toolkit; MAX_JOBS bounds the parallel compile jobs.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py as _build_py

ROOT = Path(__file__).resolve().parent


def read_tagged(path: Path, kinds: tuple[str, ...]) -> dict[str, list[str]]:
    """``<kind> <value>`` lines of csrc/sources.txt or csrc/flags.txt, grouped by kind, in file order."""
    tagged: dict[str, list[str]] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        if len(parts) != 2 or parts[0] not in kinds:
            raise SystemExit(f"{path}:{lineno}: expected '<kind> <value>' with kind in {kinds}, got {raw!r}")
        tagged.setdefault(parts[0], []).append(parts[1])
    return tagged


def find_cuda_home() -> str | None:
    """The CUDA toolkit root (with bin/nvcc and include/cuda_runtime.h), or None.

    torch.utils.cpp_extension guesses ``dirname(dirname(which nvcc))``, which is wrong when nvcc is a
    wrapper script (here /usr/local/bin/nvcc -> /usr/local/cuda-13.0); so look properly, and export
    CUDA_HOME before cpp_extension is imported.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [str(Path(nvcc).resolve().parent.parent), str(Path(nvcc).parent.parent)]
    candidates += ["/usr/local/cuda"]
    for home in candidates:
        if (
            home
            and (Path(home) / "bin" / "nvcc").is_file()
            and (Path(home) / "include" / "cuda_runtime.h").is_file()
        ):
            return home
    return None


def extension_modules() -> tuple[list, dict]:
    import torch

    sources = read_tagged(ROOT / "csrc" / "sources.txt", ("cpu", "cuda"))
    flags = read_tagged(ROOT / "csrc" / "flags.txt", ("cxx", "nvcc", "arch", "link"))
    cuda_home = None
    if os.environ.get("GRPO_FAST_NO_CUDA", "0") in ("", "0") and torch.version.cuda:
        cuda_home = find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home
        else:
            print(
                "grpo_fast: torch has CUDA but no nvcc was found: building the CPU kernels only",
                file=sys.stderr,
            )
    # Imported only now: cpp_extension reads CUDA_HOME once, at import.
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    files = list(sources.get("cpu", []))
    kwargs: dict = {
        "extra_compile_args": {"cxx": list(flags.get("cxx", []))},
        "extra_link_args": list(flags.get("link", [])),
    }
    if cuda_home:
        files += sources.get("cuda", [])
        nvcc_flags = list(flags.get("nvcc", []))
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            nvcc_flags += flags.get("arch", [])  # else cpp_extension turns the list into -gencode flags
        kwargs["extra_compile_args"]["nvcc"] = nvcc_flags
        kwargs["define_macros"] = [("GRPO_FAST_WITH_CUDA", None)]
        ext = CUDAExtension("grpo_fast._C", files, **kwargs)
    else:
        ext = CppExtension("grpo_fast._C", files, **kwargs)
    print(
        f"grpo_fast: building grpo_fast._C {'with' if cuda_home else 'without'} CUDA kernels "
        f"(torch {torch.__version__}, CUDA_HOME={cuda_home})",
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


class build_py(_build_py):
    """Also copies the top-level kernels/ modules into grpo_fast.kernels.

    kernels/ is no package (no ``__init__.py``), so it never shadows the Hugging Face ``kernels`` from the
    repository root; a source checkout reaches it through grpo_fast.kernels' ``__path__``, a wheel needs
    the files themselves.
    """

    def find_package_modules(self, package: str, package_dir: str) -> list[tuple[str, str, str]]:
        modules = super().find_package_modules(package, package_dir)
        if package == "grpo_fast.kernels":
            sources = sorted((ROOT / "kernels").glob("*.py"))
            modules += [(package, f.stem, str(f.relative_to(ROOT))) for f in sources]
        return modules


ext_modules, cmdclass = extension_modules()
setup(
    packages=find_packages(include=["grpo_fast", "grpo_fast.*"]),
    ext_modules=ext_modules,
    cmdclass={**cmdclass, "build_py": build_py},
)
