"""The installed layout: nothing in the repository root shadows a real package, the Triton kernels are
``grpo_fast.kernels`` in a checkout and in a built wheel, and private upstream APIs fail with one clear
error.

The commands run as subprocesses from the repository root, where ``python -m``, ``python -c``, ``torchrun``
and a script saved there all put the root on ``sys.path``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
import textwrap
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()


def run_from_root(*args: str, timeout: float = 180) -> str:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{args}: rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout


def test_top_level_kernels_is_the_hugging_face_package_from_the_root():
    pytest.importorskip("kernels")  # transformers' dependency: installed by the lock
    where = run_from_root("-c", "import kernels; print(kernels.__file__)").strip()
    assert Path(where).resolve().is_relative_to(SITE), where
    run_from_root("-c", "import transformers.integrations.hub_kernels")


def test_grpo_fast_kernels_are_the_checkouts_triton_kernels_from_the_root():
    out = run_from_root(
        "-c", "import grpo_fast.kernels.chunk_stats as m, kernels; print(m.__file__); print(kernels.__file__)"
    )
    ours, theirs = out.split()
    assert Path(ours).resolve() == ROOT / "kernels" / "chunk_stats.py"
    assert not Path(theirs).resolve().is_relative_to(ROOT / "kernels")


def test_the_readmes_commands_run_from_the_root():
    run_from_root("-m", "grpo_fast.cli", "--help")
    run_from_root(
        "-m", "torch.distributed.run", "--nproc-per-node", "1", "-m", "grpo_fast.cli", "train", "--help"
    )
    script = ROOT / f"_scratch_{uuid.uuid4().hex}.py"  # a user's script beside the checkout's files
    script.write_text(
        "from grpo_fast.integrations.trl import FastGRPOTrainer\nimport grpo_fast.kernels.chunk_grad\n"
        "import kernels\nprint(kernels.__file__)\n"
    )
    try:
        pytest.importorskip("trl")
        where = run_from_root(str(script.name)).strip()
    finally:
        script.unlink()
    assert not Path(where).resolve().is_relative_to(ROOT / "kernels")


def test_the_trl_test_modules_collect_from_the_root():
    modules = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_trl*.py"))
    out = run_from_root("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *modules)
    assert "error" not in out.lower().splitlines()[-1], out[-3000:]


def test_a_built_wheel_ships_the_kernels_inside_grpo_fast_only(tmp_path):
    """setup.py's build_py is what a wheel holds: kernels/ inside grpo_fast, no top-level package."""
    run_from_root("setup.py", "-q", "build_py", "--build-lib", str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grpo_fast"]
    shipped = {p.name for p in (tmp_path / "grpo_fast" / "kernels").glob("*.py")}
    sources = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert sources and shipped == sources | {"__init__.py"}
    # From the built tree the kernels are its own files, not the checkout's.
    code = textwrap.dedent(
        """
        import importlib.util, sys
        sys.modules.pop("grpo_fast", None)
        spec = importlib.util.spec_from_file_location(
            "grpo_fast.kernels", "grpo_fast/kernels/__init__.py",
            submodule_search_locations=["grpo_fast/kernels"])
        package = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(package)
        print(package.__path__)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert str(ROOT / "kernels") not in proc.stdout, proc.stdout


def test_compiled_path_without_the_private_dispatch_api_names_the_torch_version(monkeypatch):
    from grpo_fast.engine import compile_ops

    monkeypatch.delattr(torch._C, "_ForceDispatchKeyGuard")
    with pytest.raises(RuntimeError, match=rf"_ForceDispatchKeyGuard.*torch {re.escape(torch.__version__)}"):
        with compile_ops._autograd_inside_op():
            pass
