"""bench/gpu_smoke.sh is for a GPU machine and not run by CI: here its shell syntax is checked, its Python part
imported, and the roofline arithmetic it prints checked against the formulas written out again."""

import importlib.util
import subprocess
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", BENCH / "gpu_smoke.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_parses_and_is_not_in_ci():
    subprocess.run(["bash", "-n", str(BENCH / "gpu_smoke.sh")], check=True)
    script = (BENCH / "gpu_smoke.sh").read_text()
    assert "set -euo pipefail" in script and "-m gpu" in script and "bench/gpu_smoke.py" in script
    assert "gpu_smoke" not in (BENCH.parent / ".ci" / "run").read_text()


def test_roofline_shapes_and_arithmetic():
    smoke = _smoke()
    names = [shape.name for shape in smoke.shapes()]
    for model in ("30B-A3B", "235B-A22B"):
        assert [f"fused_experts {model} T={t}" in names for t in (1, 64, 4096)] == [True] * 3
        assert f"prefill attention {model} S=8K" in names
    assert {"paged decode B=1 L=4K", "paged decode B=1 L=32K", "paged decode B=64 L=4K"} <= set(names)
    assert len(smoke.calls()) == len(names)

    h200, flops, label = smoke.peaks("NVIDIA H200")
    assert (h200, flops, label) == (4.8e12, 989e12, "H200") and smoke.peaks("NVIDIA H100 80GB HBM3")[0] == 3.35e12
    assert "assumed" in smoke.peaks("NVIDIA L4")[2]

    decode = smoke.decode_shape(1, 4096)  # K and V of 4 heads of 128 bf16 values per position
    assert decode.bytes == 2 * 4096 * 4 * 128 * 2 and decode.bound(h200, flops) == "HBM"
    assert decode.ideal_seconds(h200, flops) == pytest.approx(decode.bytes / 4.8e12)
    prefill = smoke.prefill_shape("30B-A3B", 8192)  # causal: half of 4 S^2 Hq D
    assert prefill.flops == 2 * 8192**2 * 32 * 128 and prefill.bound(h200, flops) == "compute"
    one = smoke.experts_shape("30B-A3B", 1)  # one token: its 8 experts' weights
    assert one.bytes == pytest.approx(8 * 3 * 2048 * 768 * 2 + 2 * 2048 * 2 + 8 * 8)
    many = smoke.experts_shape("235B-A22B", 4096)  # every expert touched, compute-bound on H200
    assert many.bytes > 127.9 * 3 * 4096 * 1536 * 2 and many.bound(h200, flops) == "compute"
