"""The `qwen-fast` command line: `check` (environment, backends, self-test against the reference) and `bench`."""

import contextlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from numerics import TOLERANCE

import qwen_fast
from qwen_fast.cli import bench, main, selftest


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -P -m qwen_fast ARGS` (-P: the installed qwen_fast, not the source tree's)."""
    return subprocess.run([sys.executable, "-P", "-m", "qwen_fast", *args], capture_output=True, text=True, timeout=600)


def test_check_passes_on_cpu_and_torch_and_records_the_backend(tmp_path):
    ops = ["fused_topk", "reshape_and_cache", "flash_attn_with_kvcache"]
    out = _cli("check", "--ops", *ops, "--backends", "cpu", "torch", "--json", str(tmp_path / "check.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "extension qwen_fast._C: loaded" in out.stdout  # the report comes first
    for op in ops:
        for backend in ("cpu", "torch"):
            assert any(line.startswith(f"PASS  {op} ") and f" {backend} " in line for line in out.stdout.splitlines())
    document = json.loads((tmp_path / "check.json").read_text())
    assert document["environment"]["torch"] == torch.__version__
    assert document["backends"] == qwen_fast.backends()
    results = {(r["op"], r["backend"], r["device"]): r for r in document["results"]}
    expected = {(op, b, "cpu") for op in ops for b in ("cpu", "torch")}
    expected |= {(op, "torch", "cuda") for op in ops} if torch.cuda.is_available() else set()
    assert set(results) == expected
    for (_, backend, _), result in results.items():
        assert result["status"] == "PASS" and result["ran"] == [backend]
        assert result["max_abs_error"] <= 1e-4 and result["seconds"] > 0


def test_no_command_prints_the_report_only():
    out = _cli()
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"qwen_fast {qwen_fast.__version__} on Python")
    assert "extension qwen_fast._C: loaded" in out.stdout and "self-test" not in out.stdout
    assert out.stdout.rstrip().endswith(qwen_fast.ops.report.format_backends(qwen_fast.backends()).splitlines()[-1])


def test_console_script_version():
    script = Path(sys.executable).parent / "qwen-fast"
    if not script.exists():
        pytest.skip(f"no console script at {script} (qwen_fast installed without its entry points)")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == f"qwen-fast {qwen_fast.__version__}"


def test_every_public_op_has_a_case():
    assert set(selftest.CASES) == set(qwen_fast.ops.OPS)
    assert selftest.TOLERANCE is TOLERANCE  # the test suite's one table


def test_check_reports_a_wrong_result(tmp_path, monkeypatch, capsys):
    """A reference that disagrees with the kernels (here: one cache entry off by 1) is a FAIL and exit status 1."""
    real = qwen_fast.reference.reshape_and_cache

    def off_by_one(key, value, key_cache, value_cache, slot_mapping):
        real(key, value, key_cache, value_cache, slot_mapping)
        key_cache[0, 3, 1, 5] += 1

    monkeypatch.setattr(qwen_fast.reference, "reshape_and_cache", off_by_one)
    path = tmp_path / "check.json"
    assert main(["check", "--ops", "reshape_and_cache", "--backends", "cpu", "torch", "--json", str(path)]) == 1
    results = json.loads(path.read_text())["results"]
    assert {(r["backend"], r["device"]) for r in results} >= {("cpu", "cpu"), ("torch", "cpu")}
    assert all(r["status"] == "FAIL" and r["ran"] == [r["backend"]] for r in results)
    assert all(r["max_abs_error"] == pytest.approx(1.0) and "key_cache[0, 3, 1, 5]" in r["error"] for r in results)
    assert f"0 passed, {len(results)} failed" in capsys.readouterr().out


def test_check_reports_the_wrong_backend(monkeypatch):
    """If the forced backend did not run (here: use_backend ignored, so `auto` picks cpu), the record says so."""
    monkeypatch.setattr(qwen_fast, "use_backend", lambda name: contextlib.nullcontext())
    result = selftest.run_case("fused_topk", "torch", torch.device("cpu"))
    assert result.status == "FAIL" and result.ran == ["cpu"], result
    assert "ran on ['cpu'], not torch" in result.error


def test_check_reports_a_crash():
    result = selftest.run_case("fused_experts", "cuda", torch.device("cpu"))  # fused_experts has no cuda backend
    assert result.status == "FAIL" and result.error.startswith("RuntimeError: qwen_fast.fused_experts: backend 'cuda'")


@pytest.mark.interpret
@pytest.mark.parametrize("op", [op for op in selftest.CASES if "triton" in qwen_fast.ops.OPS[op].impls])
def test_check_triton_under_the_interpreter(op):
    result = selftest.run_case(op, "triton", torch.device("cpu"))
    assert result.status == "PASS" and result.ran == ["triton"], result


def test_check_with_nothing_to_test_says_so(capsys):
    assert main(["check", "--ops", "fused_experts", "--backends", "cuda"]) == 2  # fused_experts has no cuda backend
    assert "no usable backend among ['cuda'] for fused_experts" in capsys.readouterr().err


def test_default_plan_leaves_out_the_reference_against_itself():
    """The torch backend is the reference: check tests it only when asked, and then says what its row means."""
    cases = selftest.plan(["fused_topk", "flash_attn_func"], None, quick=False)
    assert cases and all(backend != "torch" for _, backend, *_ in cases)
    assert {(op, b) for op, b, d, *_ in cases if d.type == "cpu"} >= {("fused_topk", "cpu"), ("flash_attn_func", "cpu")}
    line = selftest.run_case("fused_topk", "torch", torch.device("cpu")).line()
    assert line.startswith("PASS") and "the reference against itself" in line
    if torch.cuda.is_available():  # triton's self-test covers bf16 where the backend can (not the interpreter)
        assert ("flash_attn_func", "triton", torch.bfloat16) in {(op, b, dt) for op, b, d, _, dt in cases}


def test_quick_plans_autos_choice_only():
    cases = selftest.plan(["fused_topk", "fused_experts"], None, quick=True)
    cpu = [(op, backend) for op, backend, device, *_ in cases if device.type == "cpu"]
    assert cpu == [("fused_topk", "cpu"), ("fused_experts", "cpu")]


SUITE = """
import time

import pytest


@pytest.mark.parametrize("impl, seconds", [("slow", 5e-3), ("fast", 1e-3)])
@pytest.mark.parametrize("size", [1, 2])
def test_sleep(benchmark, impl, seconds, size):
    benchmark.pedantic(time.sleep, (seconds * size,), rounds=3)
    benchmark.extra_info.update(op="sleep", shape=f"size={size}", impl=impl, baseline="slow", device="cpu")


def test_unlabelled(benchmark):
    benchmark(lambda: None)
"""


def test_bench_writes_json_and_plots(tmp_path, capsys):
    suites, out = tmp_path / "suites", tmp_path / "results"
    suites.mkdir()
    (suites / "bench_sleep.py").write_text(textwrap.dedent(SUITE))
    assert main(["bench", str(suites), "--out", str(out), "--quick"]) == 0
    names = [b["name"] for b in json.loads((out / "bench.json").read_text())["benchmarks"]]
    assert len(names) == 5
    assert (out / "sleep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "1 benchmarks lack extra_info op/shape/impl/baseline" in printed and "test_unlabelled" in printed
    rows, unnamed = bench.load(out / "bench.json")
    speedups = {(r["shape"], r["impl"]): r["speedup"] for r in rows}
    assert speedups[("size=1", "slow")] == 1.0 and speedups[("size=2", "slow")] == 1.0
    assert all(2 < speedups[(s, "fast")] < 10 for s in ("size=1", "size=2"))  # sleeps of 1 ms vs 5 ms (median of 3)


def test_bench_missing_dir_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path / "bench"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert "not found" in error and "source checkout" in error
    assert not (tmp_path / "out").exists()


def test_bench_without_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    (tmp_path / "bench_x.py").write_text("")
    real = bench.importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None if name == "matplotlib" else real(name))
    assert main(["bench", str(tmp_path)]) == 2
    assert "pip install 'qwen-fast[bench]'" in capsys.readouterr().err


def test_help_and_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "check" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2 and "invalid choice: 'frobnicate'" in capsys.readouterr().err
