"""Tuned tile configs as data (qwen_fast.configs, table "moe_gemm"): lookup, validation, the Triton launcher using
them, compile_specs() covering them, and the tuner bench/tune_moe.py writing them."""

import doctest
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from numerics import assert_close

import qwen_fast
from qwen_fast import configs
from qwen_fast.kernels import moe_gemm
from qwen_fast.ops.moe_align import choose_block_size
from qwen_fast.reference.moe import fused_experts

SHAPE = moe_gemm.shape_key(8, 40, 24, 2, torch.float32)  # E=8,H=40,I=24,k=2,dtype=float32


def _entry(block_m: int, n: int = 16, k: int = 16, warps: int = 4, stages: int = 2) -> dict:
    tiles = {"BLOCK_N": n, "BLOCK_K": k, "num_warps": warps, "num_stages": stages}
    return {"BLOCK_M": block_m, "gate_up": dict(tiles), "down": dict(tiles)}


def _write(directory: Path, device: str, data: object) -> Path:
    path = configs.config_path(directory, "moe_gemm", device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _lookup(shape: str, num_tokens: int, device: str = "cpu") -> dict | None:
    return configs.lookup("moe_gemm", moe_gemm.validate_config, device, shape, num_tokens)


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty $QWEN_FAST_CONFIG_DIR, with the file cache cleared before and after."""
    monkeypatch.setenv(configs.ENV_DIR, str(tmp_path))
    configs.clear_cache()
    yield tmp_path
    configs.clear_cache()


def test_docstring_example():
    result = doctest.testmod(configs, extraglobs={"qwen_fast": qwen_fast}, verbose=False)
    assert result.failed == 0 and result.attempted > 0


def test_device_name():
    assert configs.device_name(torch.device("cpu")) == "cpu"
    if torch.cuda.is_available():
        assert re.fullmatch(r"[A-Za-z0-9_]+", configs.device_name(torch.device("cuda")))


def test_nearest_tokens_in_log2(config_dir):
    _write(config_dir, "cpu", {SHAPE: {"1": _entry(16), "16": _entry(32), "256": _entry(128)}})
    picked = {t: _lookup(SHAPE, t)["BLOCK_M"] for t in (1, 3, 4, 5, 16, 100, 10000)}
    # 4 is 2 octaves from both 1 and 16 (tie: the smaller T); 100 is nearer 16 linearly but 256 in log2
    assert picked == {1: 16, 3: 16, 4: 16, 5: 32, 16: 32, 100: 128, 10000: 128}


def test_miss_uses_heuristic_and_logs_once(config_dir, caplog):
    _write(config_dir, "cpu", {SHAPE: {"1": _entry(16)}})
    other = moe_gemm.shape_key(8, 40, 24, 2, torch.float16)
    with caplog.at_level(logging.INFO, logger="qwen_fast"):
        assert _lookup(other, 8) is None and _lookup(other, 64) is None
        assert _lookup(SHAPE, 8, device="NVIDIA_H100_80GB_HBM3") is None
        assert _lookup(SHAPE, 8) is not None
    misses = [r.getMessage() for r in caplog.records if r.name == "qwen_fast"]
    assert len(misses) == 2, misses  # one per (kernel, device, shape), none on a hit
    assert "float16" in misses[0] and "cpu" in misses[0] and "heuristic" in misses[0]
    assert "NVIDIA_H100_80GB_HBM3" in misses[1] and str(config_dir) in misses[1]


def test_env_dir_is_searched_first(config_dir, tmp_path_factory, monkeypatch):
    package = tmp_path_factory.mktemp("package")
    monkeypatch.setattr(configs, "PACKAGE_DIR", package)
    shape_b = moe_gemm.shape_key(8, 40, 24, 2, torch.float16)
    _write(package, "cpu", {SHAPE: {"8": _entry(16)}, shape_b: {"8": _entry(32)}})
    assert _lookup(SHAPE, 8)["BLOCK_M"] == 16
    _write(config_dir, "cpu", {SHAPE: {"8": _entry(64)}})
    configs.clear_cache()
    assert _lookup(SHAPE, 8)["BLOCK_M"] == 64  # the user's file wins for the shapes it has
    assert _lookup(shape_b, 8)["BLOCK_M"] == 32  # and the package's serves the others
    other = tmp_path_factory.mktemp("other")
    _write(other, "cpu", {SHAPE: {"8": _entry(128)}})
    monkeypatch.setenv(configs.ENV_DIR, str(other))
    assert _lookup(SHAPE, 8)["BLOCK_M"] == 128  # a changed $QWEN_FAST_CONFIG_DIR needs no clear_cache()


def _bad_entry(**change) -> dict:
    entry = _entry(32)
    for key, value in change.items():
        gemm, _, field = key.partition("__")
        if field:
            entry[gemm][field] = value
        elif value is None:
            del entry[gemm]
        else:
            entry[gemm] = value
    return entry


@pytest.mark.parametrize(
    "data,message",
    [
        ("{not json", "cannot be read as JSON"),
        ([1, 2], "must be a JSON object of shape keys, got list"),
        ({SHAPE: {}}, "must be a non-empty object keyed by T"),
        ({SHAPE: {"many": _entry(16)}}, r"entry \[.*\]\['many'\]: the key must be a token count"),
        ({SHAPE: {"0": _entry(16)}}, r"\['0'\]: the key must be a token count T >= 1"),
        ({SHAPE: {"8": [16]}}, r"\['8'\]: must be an object, got list"),
        ({"E=8,H=40": {"8": _entry(16)}}, r"\['E=8,H=40'\]\['8'\]: the shape key must look like"),
        ({SHAPE.replace("float32", "int8"): {"8": _entry(16)}}, "the shape key must look like"),
        ({SHAPE.replace("E=8", "E=0"): {"8": _entry(16)}}, "must be integers >= 1"),
        ({SHAPE: {"8": _entry(48)}}, r"\['8'\]: BLOCK_M must be one of \[16, 32, 64, 128, 256\], got 48"),
        ({SHAPE: {"8": _bad_entry(BLOCK_M=True)}}, "BLOCK_M must be one of .*, got True"),
        ({SHAPE: {"8": _bad_entry(down=None)}}, r"must have exactly the keys BLOCK_M, gate_up, down, got \['BLOCK_M'"),
        ({SHAPE: {"8": _bad_entry(gate_up__extra=1)}}, "gate_up must have exactly the keys BLOCK_N, BLOCK_K"),
        ({SHAPE: {"8": _bad_entry(down__BLOCK_N=8)}}, "down.BLOCK_N must be one of .*, got 8"),
        ({SHAPE: {"8": _bad_entry(gate_up__num_warps=3)}}, "gate_up.num_warps must be one of .*, got 3"),
        ({SHAPE: {"8": _bad_entry(down__num_stages=0)}}, "down.num_stages must be one of .*, got 0"),
    ],
)
def test_malformed_file_is_a_named_error(config_dir, data, message):
    path = _write(config_dir, "cpu", data)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + message):
        _lookup(SHAPE, 8)


def test_write_entries_merges_and_validates(config_dir):
    path = configs.config_path(config_dir, "moe_gemm", "cpu")
    configs.write_entries(path, moe_gemm.validate_config, SHAPE, {1: _entry(16), 64: _entry(32)})
    configs.write_entries(path, moe_gemm.validate_config, SHAPE, {64: _entry(64), 8: _entry(32)})
    assert list(json.loads(path.read_text())[SHAPE]) == ["1", "8", "64"]  # sorted by T, 64 replaced
    assert _lookup(SHAPE, 64)["BLOCK_M"] == 64
    before = path.read_text()
    with pytest.raises(ValueError, match=r"\['2'\]: BLOCK_M must be one of"):
        configs.write_entries(path, moe_gemm.validate_config, SHAPE, {2: _entry(48)})
    assert path.read_text() == before


class _LaunchSpy:
    """Stands in for a @triton.jit kernel: records each launch's grid and tile arguments, then launches."""

    def __init__(self, kernel, calls: list):
        self.kernel, self.calls = kernel, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tiles = {k: kwargs.get(k) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages")}
            self.calls.append((self.kernel.__name__, grid, tiles))
            return self.kernel[grid](*args, **kwargs)

        return launch


@pytest.mark.interpret
def test_triton_launcher_uses_the_tuned_entry(config_dir, monkeypatch):
    """With a tuned cpu.json the launcher asks moe_align for the tuned BLOCK_M (not choose_block_size's) and launches
    the GEMMs with the tuned tiles and grids; without it, the heuristic's. Both outputs match the reference."""
    import qwen_fast.ops.moe_align as align

    num_tokens, num_experts, topk, hidden, inter = 8, 8, 2, 40, 24
    tuned = {"BLOCK_M": 32, "gate_up": {"BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1},
             "down": {"BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 3}}  # fmt: skip
    heuristic = moe_gemm.heuristic_config(num_tokens, topk, num_experts, hidden, inter, torch.float32)
    assert heuristic["BLOCK_M"] == choose_block_size(num_tokens, topk, num_experts) == 16
    _write(config_dir, "cpu", {SHAPE: {"4": tuned}})

    sizes, launches = [], []
    real_align = align.MOE_ALIGN_BLOCK_SIZE.impls["triton"]  # the launcher aligns on the forced backend: triton

    def align_spy(ids, size, num_experts):
        sizes.append(size)
        return real_align(ids, size, num_experts)

    monkeypatch.setitem(align.MOE_ALIGN_BLOCK_SIZE.impls, "triton", align_spy)
    monkeypatch.setattr(moe_gemm, "_gate_up_kernel", _LaunchSpy(moe_gemm._gate_up_kernel, launches))
    monkeypatch.setattr(moe_gemm, "_down_kernel", _LaunchSpy(moe_gemm._down_kernel, launches))
    x = torch.randn(num_tokens, hidden)
    w13, w2 = torch.randn(num_experts, 2 * inter, hidden) / 7, torch.randn(num_experts, hidden, inter) / 5
    weights, ids = qwen_fast.reference.topk_routing(torch.randn(num_tokens, num_experts), topk)
    expected = fused_experts(x, w13, w2, weights, ids)

    for entry in (tuned, heuristic):
        sizes.clear()
        launches.clear()
        with qwen_fast.use_backend("triton"), qwen_fast.record_backends() as calls:
            out = qwen_fast.fused_experts(x, w13, w2, weights, ids)
        assert ("fused_experts", "triton") in calls
        assert_close(out, expected)
        assert sizes == [entry["BLOCK_M"]]
        gate_up, down = launches
        assert gate_up[0] == "_gate_up_kernel" and gate_up[1][1] == -(-inter // entry["gate_up"]["BLOCK_N"])
        assert gate_up[2] == {"BLOCK_M": entry["BLOCK_M"], **entry["gate_up"]}
        assert down[0] == "_down_kernel" and down[1][1] == -(-hidden // entry["down"]["BLOCK_N"])
        assert down[2] == {"BLOCK_M": entry["BLOCK_M"], **entry["down"]}
        config_dir.joinpath("moe_gemm", "cpu.json").unlink(missing_ok=True)
        configs.clear_cache()


def _spec_keys(specs) -> set:
    return {
        (s.name, s.args[0].dtype, *(s.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K")), s.num_warps, s.num_stages)
        for s in specs
        if "BLOCK_M" in s.kwargs
    }


def test_compile_specs_cover_tuned_files(config_dir):
    shipped = _spec_keys(moe_gemm.compile_specs())
    entry = {"BLOCK_M": 256, "gate_up": {"BLOCK_N": 16, "BLOCK_K": 128, "num_warps": 2, "num_stages": 4},
             "down": {"BLOCK_N": 256, "BLOCK_K": 32, "num_warps": 16, "num_stages": 5}}  # fmt: skip
    _write(config_dir, "NVIDIA_H100_80GB_HBM3", {moe_gemm.shape_key(128, 2048, 768, 8, torch.float16): {"64": entry}})
    configs.clear_cache()
    with_file = _spec_keys(moe_gemm.compile_specs())
    assert with_file - shipped == {
        ("_gate_up_kernel", torch.float16, 256, 16, 128, 2, 4),
        ("_down_kernel", torch.float16, 256, 256, 32, 16, 5),
    }


def _tuner():
    path = Path(__file__).resolve().parents[1] / "bench" / "tune_moe.py"
    spec = importlib.util.spec_from_file_location("tune_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--experts", "4", "--hidden", "32", "--inter", "16", "--topk", "2", "--dtype", "float32"]


def test_tuner_help_and_dry_run(capsys):
    tuner = _tuner()
    with pytest.raises(SystemExit) as exit_info:
        tuner.main(["--help"])
    assert exit_info.value.code == 0 and "--experts" in capsys.readouterr().out
    qwen3 = ["--experts", "128", "--hidden", "2048", "--inter", "768", "--topk", "8", "--dtype", "bfloat16"]
    assert tuner.main([*qwen3, "--tokens", "1", "4096", "--device", "cpu", "--dry-run"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("T=")]
    # T = 1: 8 rows on 8 experts, 1 row each: BLOCK_M past 2 * 16 is cut; T = 4096: 256 rows each, all kept
    assert lines[0].startswith("T=1: ") and "M32:" in lines[0] and "M64" not in lines[0]
    assert all(f"M{m}:" in lines[1] for m in (16, 32, 64, 128))


def test_tuner_refuses_cpu_without_the_interpreter(monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1"):
        _tuner().main([*TINY, "--device", "cpu", "--out-dir", str(tmp_path)])


@pytest.mark.interpret
def test_tuner_writes_a_table_the_launcher_reads(config_dir, capsys):
    """Two candidates (BLOCK_M 16 and 32, one tile each) plus the heuristic, each checked and timed under the
    interpreter; the winner is written to $QWEN_FAST_CONFIG_DIR and is what the lookup then returns."""
    args = [*TINY, "--tokens", "16", "--block-m", "16", "32", "--block-n", "16", "--block-k", "16"]
    assert _tuner().main([*args, "--warps", "4", "--stages", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "smoke test" in out and "T=16: 3 timed; best" in out
    shape = moe_gemm.shape_key(4, 32, 16, 2, torch.float32)
    table = json.loads(configs.config_path(config_dir, "moe_gemm", "cpu").read_text())
    assert list(table) == [shape] and list(table[shape]) == ["16"]
    best = configs.lookup("moe_gemm", moe_gemm.validate_config, "cpu", shape, 16)
    assert best == table[shape]["16"] and f"best {_tuner().describe(best)} " in out


@pytest.mark.slow
def test_tuner_spill_check_names_a_spilling_candidate():
    """The tuner's SpillCheck compiles a candidate for sm_90 as gpu_check does (no GPU needed; in a subprocess, as
    the interpreter replaces the compiler): gate_up at M = N = 128 with 4 warps holds 2 * 128 * 128 / 128 = 256 fp32
    accumulator registers per thread, more than the 255 a thread has, so it must spill; the heuristic's tiles do not."""
    tune_moe = Path(__file__).resolve().parents[1] / "bench" / "tune_moe.py"
    code = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("tune_moe", {str(tune_moe)!r})
tuner = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tuner)
check = tuner.SpillCheck(90)
tiles = {{"BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 2}}
print(check(torch.float16, {{"BLOCK_M": 128, "gate_up": tiles | {{"BLOCK_N": 128}}, "down": tiles}}))
print(check(torch.float16, tuner.moe_gemm.heuristic_config(64, 8, 128, 2048, 768, torch.float16)))
"""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    # -P: import the installed qwen_fast, never the source tree in the working directory (no _C, no kernels there)
    result = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    spilled, clean = result.stdout.splitlines()[-2:]
    assert spilled.startswith("_gate_up_kernel sm_90: spills or local memory") and clean == "None"
