"""The extension is built, loads, and registers every schema in csrc/torch_bindings.cpp with its kernels."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qwen_fast
from qwen_fast import _native

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def _declared(pattern: str, files) -> set[str]:
    return {name for path in files for name in re.findall(pattern, path.read_text())}


SCHEMAS = _declared(r'm\.def\(\s*"(\w+)\(', [CSRC / "torch_bindings.cpp"])
CPU_IMPLS = _declared(r'm\.impl\("(\w+)"', sorted((CSRC / "cpu").glob("*.cpp")))
CUDA_IMPLS = _declared(r'm\.impl\("(\w+)"', sorted((CSRC / "cuda").glob("*.cu")))


def test_extension_loads():
    assert _native.LOAD_ERROR is None, f"qwen_fast._C failed to load: {_native.LOAD_ERROR}"
    assert SCHEMAS, "no schemas found in csrc/torch_bindings.cpp"


@pytest.mark.parametrize("op", sorted(SCHEMAS))
def test_schema_registered_with_cpu_kernel_and_fake(op):
    assert hasattr(torch.ops.qwen_fast, op), f"torch.ops.qwen_fast.{op} is not registered"
    assert op in CPU_IMPLS, f"{op} has a schema but no CPU implementation in csrc/cpu/"
    assert _native.has_kernel(op, "CPU")
    entry = torch._library.simple_registry.singleton.find(f"qwen_fast::{op}")
    assert entry.fake_impl.kernel is not None, f"qwen_fast::{op} has no fake (register it in qwen_fast/ops/)"


def test_cuda_kernels_all_or_none():
    """A CUDA build registers every CUDA implementation in csrc/cuda/; a CPU-only build registers none."""
    registered = {op for op in CUDA_IMPLS if _native.has_kernel(op, "CUDA")}
    assert registered in (set(), CUDA_IMPLS), f"partial CUDA registration: {registered} of {CUDA_IMPLS}"
    if torch.version.cuda is None:
        assert registered == set()


def test_every_native_op_is_a_public_op():
    assert SCHEMAS <= set(qwen_fast.ops.OPS), f"schemas without a public op: {SCHEMAS - set(qwen_fast.ops.OPS)}"


def test_import_works_without_the_extension(tmp_path):
    """With qwen_fast._C unavailable, import warns once, the cpu/cuda backends say why, and the others still work."""
    script = (
        "import sys, warnings\n"
        "sys.modules['qwen_fast._C'] = None\n"  # makes `from qwen_fast import _C` raise ImportError
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import qwen_fast, torch\n"
        "assert any('qwen_fast._C is not available' in str(w.message) for w in caught), caught\n"
        "row = qwen_fast.backends()['reshape_and_cache']\n"
        "assert row['cpu'].startswith('the C++ extension is not built'), row\n"
        "assert row['torch'] == 'usable on cpu', row\n"
        "kc = torch.zeros(2, 4, 1, 8); k = torch.randn(1, 1, 8)\n"
        "with qwen_fast.record_backends() as calls:\n"
        "    qwen_fast.reshape_and_cache(k, k, kc, kc.clone(), torch.tensor([5]))\n"
        "assert calls == [('reshape_and_cache', 'torch')] and torch.equal(kc[1, 1], k[0]), calls\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_source_tree_import_says_what_happened(tmp_path):
    """Imported from a checkout (csrc/ beside qwen_fast/) with no built _C: the warning says the checkout shadows
    the installed copy and how to avoid it; a built checkout (editable install) or an installed copy says nothing."""
    package = tmp_path / "qwen_fast"
    package.mkdir()
    assert _native._shadowed_message(package) is None  # no csrc/: an installed copy
    (tmp_path / "csrc").mkdir()
    message = _native._shadowed_message(package)
    assert f"imported from the source tree {package}" in message and "no built extension next to it" in message
    assert "Run from another directory, or with `python -P`" in message
    (package / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    assert _native._shadowed_message(package) is None


def test_setup_announces_what_it_compiles(tmp_path):
    """The build says which kernels it compiles, for which arches, and about how long it takes, before it starts."""
    script = (
        "import os, runpy, setuptools\n"
        "setuptools.setup = lambda **kwargs: None\n"
        "os.environ.update(MAX_JOBS='2', QWEN_FAST_SKIP_CUDA='1')\n"
        f"runpy.run_path({str(CSRC.parent / 'setup.py')!r})\n"
    )
    result = subprocess.run([sys.executable, "-P", "-c", script], capture_output=True, text=True, cwd=CSRC.parent)
    assert result.returncode == 0, result.stderr
    assert re.search(r"building CPU kernels \(\d+ C\+\+ sources\) with MAX_JOBS=2; roughly \d+ minutes", result.stdout)
    assert "pip install -v" in result.stdout and "QWEN_FAST_SKIP_CUDA=1" in result.stdout
