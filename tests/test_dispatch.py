"""Backend selection: auto, forcing by context manager and environment, the errors when a forced backend cannot
run (nothing falls back silently), the cached choice, record_backends, composite ops and the registrations."""

import ast
from pathlib import Path

import pytest
import torch
from numerics import assert_close
from torch._library.custom_ops import OPDEFS
from torch._subclasses.fake_tensor import FakeTensorMode

import qwen_fast
from qwen_fast.cli import selftest
from qwen_fast.cli.samples import SPECS, Inputs
from qwen_fast.ops import OPS, Op, _dispatch, record_backends, reread_environment, use_backend
from qwen_fast.ops._dispatch import NATIVE_FIRST

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def environ(monkeypatch):
    """monkeypatch for the environment, re-read by qwen_fast before and after the test."""
    reread_environment()
    yield monkeypatch
    monkeypatch.undo()
    reread_environment()


def _demo_op(**options) -> Op:
    """An op whose cpu backend is usable where reshape_and_cache's is (the extension's registry is asked for it)."""
    impls = {"cpu": lambda x: ("cpu", x), "torch": lambda x: ("torch", x)}
    return Op("demo", impls, NATIVE_FIRST, native_op="reshape_and_cache", **options)


def _kv_inputs():
    key = torch.randn(3, 2, 8)
    cache = torch.zeros(2, 4, 2, 8)
    return key, key.clone(), cache, cache.clone(), torch.tensor([0, 5, -1])


def test_auto_picks_the_cpu_kernel_for_cpu_tensors():
    with record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "cpu")]


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_use_backend_forces_and_restores(backend):
    with use_backend(backend), record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    with record_backends() as after:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", backend)]
    assert after == [("reshape_and_cache", "cpu")]


def test_use_backend_nests():
    op = _demo_op()
    with use_backend("torch"):
        with use_backend("cpu"):
            inner = op(torch.device("cpu"), 1)
        outer = op(torch.device("cpu"), 2)
        with use_backend("auto"):
            auto = op(torch.device("cpu"), 3)
    assert (inner, outer, auto) == (("cpu", 1), ("torch", 2), ("cpu", 3))
    assert qwen_fast.ops.forced_backend() is None


def test_environment_variable_is_read_once(environ):
    environ.setenv("QWEN_FAST_BACKEND", "torch")
    with record_backends() as before:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    reread_environment()
    with record_backends() as after:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert before == [("reshape_and_cache", "cpu")]  # set after import: not read yet
    assert after == [("reshape_and_cache", "torch")]
    assert qwen_fast.ops.forced_backend() == "torch"


def test_context_manager_wins_over_environment(environ):
    environ.setenv("QWEN_FAST_BACKEND", "torch")
    reread_environment()
    with use_backend("cpu"), record_backends() as calls:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    with use_backend("auto"), record_backends() as auto:
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "cpu")]
    assert auto == [("reshape_and_cache", "cpu")]


def test_unknown_backend_names_are_errors(environ):
    with pytest.raises(ValueError, match=r"use_backend\(name\) must be one of .*got 'gpu'"):
        with use_backend("gpu"):
            pass
    environ.setenv("QWEN_FAST_BACKEND", "fast")
    reread_environment()
    for _ in range(2):  # a bad name is never cached as a choice
        with pytest.raises(ValueError, match="QWEN_FAST_BACKEND must be one of .*got 'fast'"):
            qwen_fast.reshape_and_cache(*_kv_inputs())
    with use_backend("torch"), record_backends() as calls:  # use_backend still overrides it
        qwen_fast.reshape_and_cache(*_kv_inputs())
    assert calls == [("reshape_and_cache", "torch")]


def test_forcing_a_missing_backend_names_the_op_and_what_it_has():
    op = _demo_op()
    with use_backend("triton"), pytest.raises(RuntimeError, match=r"demo has no triton backend \(it has: cpu, torch\)"):
        op(torch.device("cpu"), 1)


def test_forcing_cuda_on_cpu_tensors_is_an_error():
    for _ in range(2):  # an error is never cached as a choice
        with use_backend("cuda"), pytest.raises(RuntimeError, match="runs cuda tensors, got cpu tensors.*for cpu"):
            qwen_fast.reshape_and_cache(*_kv_inputs())


def test_triton_on_cpu_needs_the_interpreter(environ):
    environ.delenv("TRITON_INTERPRET", raising=False)
    reread_environment()
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET=1.*Usable for cpu tensors: cpu"):
        qwen_fast.reshape_and_cache(*_kv_inputs())


def test_auto_never_picks_triton_for_cpu_tensors(environ):
    environ.setenv("TRITON_INTERPRET", "1")
    reread_environment()
    op = Op("demo", {"triton": lambda: "triton", "torch": lambda: "torch"}, NATIVE_FIRST)
    assert op(torch.device("cpu")) == "torch"


# --- the cached choice ---------------------------------------------------------------------------------------------


def test_probes_run_once_per_device_type_and_forced_name(environ):
    """The availability probes run when a (device type, forced name) is first seen, never again per call; use_backend
    blocks only switch entries, so leaving and re-entering them probes nothing."""
    probed = []
    real = _dispatch._native_problem
    environ.setattr(_dispatch, "_native_problem", lambda *args: probed.append(args) or real(*args))
    reread_environment()
    for _ in range(3):
        qwen_fast.reshape_and_cache(*_kv_inputs())
        with use_backend("torch"), use_backend("cpu"):
            qwen_fast.reshape_and_cache(*_kv_inputs())
    assert probed == [("reshape_and_cache", "cpu", "cpu")] * 2  # auto's entry and use_backend("cpu")'s
    assert _dispatch.forced_backend() is None


def test_reread_environment_forgets_the_cached_choices():
    op = _demo_op()
    op(torch.device("cpu"), 1)
    assert op._routes == {(torch.device("cpu"), "auto"): ("cpu", ())}  # (backend, per-call checks)
    reread_environment()
    assert op._routes == {}


def test_kernel_limit_is_checked_per_call():
    """The choice is cached, the kernels' limit is not: auto takes torch past it, a forced kernel backend fails."""
    limit = _demo_op(kernel_limit=lambda x: None if x < 10 else f"the kernels take x < 10, got {x}")
    cpu = torch.device("cpu")
    assert [limit(cpu, x)[0] for x in (1, 10, 2)] == ["cpu", "torch", "cpu"]
    message = (
        "demo: backend 'cpu' is forced but cannot run here: the kernels take x < 10, got 11. Usable for cpu tensors"
    )
    with use_backend("cpu"), pytest.raises(RuntimeError, match=message + ": torch$"):
        limit(cpu, 11)
    with use_backend("torch"):
        assert limit(cpu, 11) == ("torch", 11)


def test_fused_topk_past_the_kernels_expert_limit():
    logits = torch.randn(3, 1025)
    with record_backends() as calls:
        weights, ids, _ = qwen_fast.fused_topk(logits, logits, 2)
        qwen_fast.fused_topk(logits, logits[:, :8], 2)
    assert calls == [("fused_topk", "torch"), ("fused_topk", "cpu")]
    assert torch.equal(ids, qwen_fast.reference.topk_routing(logits, 2)[1])
    with use_backend("cpu"), pytest.raises(RuntimeError, match="1 to 1024 experts, got E = 1025"):
        qwen_fast.fused_topk(logits, logits, 2)


# --- bfloat16 under Triton's interpreter ---------------------------------------------------------------------------

CPU = torch.device("cpu")
LIMITED = {name for name, op in OPS.items() if op.interpreter_limit is not None}


def test_the_interpreter_limit_is_per_op():
    """The ops whose Triton kernels the interpreter gets wrong in bf16 (tl.dot, bf16 casts) carry the limit; the ops
    it gets right in bf16 (test_bf16_runs_where_the_interpreter_gets_it_right) do not."""
    assert LIMITED == {
        "fused_experts",
        "fused_moe",
        "flash_attn_func",
        "flash_attn_varlen_func",
        "flash_attn_with_kvcache",
        "rotary_embedding",
        "qk_norm_rope_and_cache",
    }


@pytest.mark.interpret
@pytest.mark.parametrize("name", sorted(LIMITED))
def test_forced_triton_refuses_bf16_under_the_interpreter(name):
    """Forcing triton with bf16 CPU tensors is an error naming the op, the dtype and the reason, never wrong numbers;
    fp16 still runs on triton."""
    spec = SPECS[name]
    kwargs = spec.samples[0].build(Inputs(CPU, torch.bfloat16))
    with use_backend("triton"), record_backends() as calls, pytest.raises(RuntimeError) as error:
        getattr(qwen_fast, name)(**kwargs)
    message = str(error.value)
    assert f"qwen_fast.{name}: backend 'triton' is forced" in message and "torch.bfloat16" in message, message
    assert "TRITON_INTERPRET=1" in message and ("tl.dot" in message or "casts to bf16" in message), message
    assert message.endswith("Usable for cpu tensors: cpu, torch"), message
    assert calls == []
    assert OPS[name].problem("triton", CPU, torch.bfloat16) is not None
    assert OPS[name].problem("triton", CPU, torch.float16) is None
    assert selftest.run_case(name, "triton", CPU, dtype=torch.float16).status == "PASS"


@pytest.mark.interpret
@pytest.mark.parametrize(
    "name", sorted(name for name in set(OPS) - LIMITED - {"moe_align_block_size"} if "triton" in OPS[name].impls)
)
def test_bf16_runs_where_the_interpreter_gets_it_right(name):
    result = selftest.run_case(name, "triton", CPU, dtype=torch.bfloat16)
    assert result.status == "PASS" and result.ran == ["triton"], result.line()


def test_auto_never_takes_a_kernel_the_interpreter_gets_wrong(environ):
    environ.setenv("TRITON_INTERPRET", "1")
    reread_environment()
    impls = {"triton": lambda x: "triton", "torch": lambda x: "torch"}
    op = Op("demo", impls, {"cpu": ("triton", "torch")}, interpreter_limit=_dispatch.INTERPRETER_DOT)
    assert [op(CPU, torch.ones(1, dtype=d)) for d in (torch.float32, torch.bfloat16, torch.float16)] == [
        "triton",
        "torch",
        "triton",
    ]


# --- autograd: the kernels have no backward ------------------------------------------------------------------------


def _grad_inputs(name: str) -> dict:
    """The op's first sample in fp32, its first floating-point argument (q, hidden_states, gating_output, key,
    positions' table ...: one the op reads, never a cache it writes) requiring grad."""
    kwargs = SPECS[name].samples[0].build(Inputs(CPU, torch.float32))
    # rotary_embedding rotates query and key in place (as vLLM's); fused_topk reads only hidden_states' shape
    unread = {"rotary_embedding": ("query", "key"), "fused_topk": ("hidden_states",)}.get(name, ())
    first = next(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and k not in unread
    )
    kwargs[first] = kwargs[first].detach().clone().requires_grad_()
    return kwargs


def _kernel_backends(name: str) -> list:
    return [b for b in OPS[name].impls if b != "torch" and OPS[name].problem(b, CPU) is None]


@pytest.mark.parametrize("name", sorted(set(OPS) - {"moe_align_block_size"}))
def test_kernel_backends_refuse_inputs_that_need_gradients(name):
    """Every kernel backend usable here (cpu; triton under the interpreter) refuses a call whose inputs need
    gradients when forced, names the remedies, and runs the call under torch.no_grad() / inference_mode."""
    backends = _kernel_backends(name)
    assert "cpu" in backends
    for backend in backends:
        with use_backend(backend), pytest.raises(RuntimeError) as error:
            getattr(qwen_fast, name)(**_grad_inputs(name))
        message = str(error.value)
        assert f"qwen_fast.{name}: backend '{backend}' is forced" in message and "requires grad" in message
        assert "torch.no_grad()" in message and "use_backend('torch')" in message, message
        assert message.endswith("Usable for cpu tensors: torch"), message
        for mode in (torch.no_grad, torch.inference_mode):
            with mode(), use_backend(backend), record_backends() as calls:
                getattr(qwen_fast, name)(**_grad_inputs(name))
            assert (name, backend) in calls


@pytest.mark.parametrize("name", sorted(set(OPS) - {"moe_align_block_size"}))
def test_auto_runs_inputs_that_need_gradients_on_the_reference(name):
    """auto takes the differentiable torch reference (with a warning that says why) and the gradient flows."""
    kwargs = _grad_inputs(name)
    leaf = next(v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.requires_grad)
    with record_backends() as calls, pytest.warns(UserWarning, match=f"qwen_fast.{name}: .*requires grad.*no_grad"):
        out = getattr(qwen_fast, name)(**kwargs)
    assert calls[0] == (name, "torch")
    outputs = [t for t in (out if isinstance(out, tuple) else (out,)) if isinstance(t, torch.Tensor)]
    differentiable = [t for t in outputs + list(kwargs.values()) if isinstance(t, torch.Tensor) and t.grad_fn]
    assert differentiable, f"{name}: no output depends on the input that requires grad"
    sum(t.float().sum() for t in differentiable).backward()
    assert leaf.grad is not None and leaf.grad.isfinite().all()


def test_reference_gradients_are_right():
    """The torch backend's flash_attn_func gradient is torch SDPA's (an independent implementation)."""
    q, k, v = (torch.randn(1, 5, 4, 16, requires_grad=True) for _ in range(3))
    with use_backend("torch"):
        qwen_fast.flash_attn_func(q, k, v, causal=True).square().sum().backward()
    got = [t.grad.clone() for t in (q, k, v)]
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q2.transpose(1, 2), k2.transpose(1, 2), v2.transpose(1, 2), is_causal=True
    )
    expected.transpose(1, 2).square().sum().backward()
    for actual, wanted in zip(got, (q2.grad, k2.grad, v2.grad), strict=True):
        assert_close(actual, wanted)


# --- record_backends and composite ops ------------------------------------------------------------------------------


def test_record_backends_nests_and_stops():
    op = _demo_op()
    with record_backends() as outer:
        op(torch.device("cpu"), 1)
        with record_backends() as inner:
            op(torch.device("cpu"), 2)
        op(torch.device("cpu"), 3)
    op(torch.device("cpu"), 4)
    assert inner == [("demo", "cpu")]
    assert outer == [("demo", "cpu")] * 2
    assert _dispatch._trace is None


def _moe_inputs():
    x, w13, w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 4)
    return x, w13, w2, torch.randn(3, 4)


def test_fused_moe_is_composed_of_its_ops():
    """fused_moe = fused_topk + fused_experts, each on the forced backend (or its own auto choice), all recorded."""
    inputs = _moe_inputs()
    with record_backends() as auto:
        out = qwen_fast.fused_moe(*inputs, topk=2)
    with use_backend("torch"), record_backends() as forced:
        expected = qwen_fast.fused_moe(*inputs, topk=2)
    assert auto == [("fused_moe", "cpu"), ("fused_topk", "cpu"), ("fused_experts", "cpu")]
    assert forced == [("fused_moe", "torch"), ("fused_topk", "torch"), ("fused_experts", "torch")]
    assert_close(out, expected)


@pytest.mark.interpret
def test_triton_fused_moe_runs_every_inner_op_on_triton():
    """A forced backend runs every inner op of fused_moe on it: the Triton fused_experts aligns through
    moe_align_block_size's Op (no checks, recorded) on triton too."""
    with use_backend("triton"), record_backends() as calls:
        qwen_fast.fused_moe(*_moe_inputs(), topk=2)
    assert calls == [
        ("fused_moe", "triton"),
        ("fused_topk", "triton"),
        ("fused_experts", "triton"),
        ("moe_align_block_size", "triton"),
    ]


def test_compiled_calls_keep_their_choice_without_recompiling():
    """Under torch.compile the choice is a constant of the graph: repeated calls compile once; forcing another
    backend recompiles once and runs it."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def route(logits):
        weights, ids = qwen_fast.ops.FUSED_TOPK(logits.device, logits, 2, True)
        return weights * 2, ids

    logits = torch.randn(4, 8)
    for _ in range(3):
        route(logits)
    assert counter.frame_count == 1
    with use_backend("torch"), record_backends() as calls:
        route(logits)
    assert counter.frame_count == 2 and calls == [("fused_topk", "torch")]


# --- registrations and layering -------------------------------------------------------------------------------------


def test_triton_ops_are_library_ops_with_mutation_marks():
    """The Triton ops are plain torch.library definitions (not custom_op), and the ones that write mark it."""
    triton_ops = torch.ops.qwen_fast_triton
    for name in ("fused_topk", "moe_align_block_size", "fused_experts", "flash_attn", "flash_attn_varlen",
                 "paged_attention", "reshape_and_cache", "rotary_embedding", "qk_norm_rope_and_cache"):  # fmt: skip
        schema = getattr(triton_ops, name).default._schema
        written = [arg.name for arg in schema.arguments if arg.alias_info is not None and arg.alias_info.is_write]
        expected = ["key_cache", "value_cache"] if name in ("reshape_and_cache", "qk_norm_rope_and_cache") else []
        assert written == expected, name
        assert f"qwen_fast_triton::{name}" not in OPDEFS, name


def _contract_cases() -> dict:
    """op -> (public call, the op's arguments as the kernels take them): one argument breaks the contract."""
    key, cache, slots = torch.randn(3, 2, 8), torch.zeros(2, 4, 2, 8), torch.tensor([0, 5, -1])
    x, w13, bad_w2 = torch.randn(3, 8), torch.randn(4, 8, 8), torch.randn(4, 8, 3)
    weights, ids = torch.rand(3, 2), torch.randint(0, 4, (3, 2), dtype=torch.int32)
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cu = torch.tensor([0, 5])  # int64: the kernels take int32
    odd = torch.randn(3, 2, 7)
    cos_sin = torch.randn(8, 7)
    return {
        "reshape_and_cache": (
            lambda: qwen_fast.reshape_and_cache(key, odd, cache, cache, slots),
            (key, odd, cache, cache, slots),
        ),
        "fused_topk": (lambda: qwen_fast.fused_topk(x, x, 9), (x, 9, True, "softmax", None, None, None, 1.0, "max")),
        "moe_align_block_size": (lambda: qwen_fast.moe_align_block_size(weights, 16, 4), (weights, 16, 4)),
        "fused_experts": (
            lambda: qwen_fast.fused_experts(x, w13, bad_w2, weights, ids),
            (x, w13, bad_w2, weights, ids),
        ),
        "flash_attn_varlen": (
            lambda: qwen_fast.flash_attn_varlen_func(q, k, k, cu, cu, 5, 5),
            (q, k, k, cu, cu, 5, 5, 0.25, False, -1, -1, 0.0, False),
        ),
        "rotary_embedding": (
            lambda: qwen_fast.rotary_embedding(torch.arange(3), odd, odd, 7, cos_sin, True),
            (torch.arange(3), odd, odd, cos_sin, True),
        ),
    }


@pytest.mark.parametrize("name", list(_contract_cases()))
def test_eager_check_and_fake_state_one_contract(name):
    """The public function's named error and the fake's torch._check come from one statement of the contract: the
    Triton op's fake (and the extension op's, where one exists) fails with the public function's message."""
    public, op_args = _contract_cases()[name]
    with pytest.raises((ValueError, TypeError)) as eager:
        public()
    native = {"flash_attn_varlen": "flash_attn_varlen_func"}.get(name, name)
    ops = [getattr(torch.ops.qwen_fast_triton, name)]
    ops += [getattr(torch.ops.qwen_fast, native)] if qwen_fast._native.LOAD_ERROR is None else []
    for op in ops:
        with FakeTensorMode() as mode, pytest.raises(RuntimeError) as fake:
            op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in op_args))
        assert str(eager.value) in str(fake.value), op


def test_kernels_never_import_the_ops():
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(name.startswith("qwen_fast.ops") for name in names), path.name


def test_backends_reports_every_op_and_backend():
    table = qwen_fast.backends()
    assert set(table) == set(OPS)
    for name, row in table.items():
        assert set(row) == set(qwen_fast.ops.BACKENDS)
        assert row["torch"] == "usable on cpu", name
    assert table["reshape_and_cache"]["cpu"] == "usable on cpu"
    text = qwen_fast.ops.report.format_backends(table)
    assert text.splitlines()[0].split() == ["op", "cuda", "triton", "flash_attn", "cpu", "torch"]
