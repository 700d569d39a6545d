"""`qwen-fast demo`: the same prompts through transformers, unpatched and patched by qwen_fast, side by side.

Builds the embedded small Qwen3-MoE (qwen_fast/configs/models/qwen3_moe_small.json, seeded random weights) or loads a
local checkpoint (--model PATH; never downloads), and checks up front what will run: the checkpoint, the device, the
forced backend for every op in this dtype, what `qwen_fast.patch` swaps in, and whether the model can use the paged
KV cache (multi-head latent attention, e.g. DeepSeek-V3, cannot: it runs with transformers' DynamicCache, and says
so). Then it generates greedily for a batch of prompts (random token ids, or --prompt texts when the checkpoint has a
tokenizer) with the unpatched model and with `qwen_fast.patch(model)` and a `qwen_fast.PagedKVCache`, in --rounds
alternating rounds (unpatched, patched, unpatched, ...), and prints which backend ran each part, the largest logit
difference against the unpatched run, whether the generated tokens agree, and tokens/s for both sides: median and
spread over the rounds, the thread count, and a one-line reading of the ratio.

--experts fp8|int8 runs qwen_fast's side with 8-bit experts (qwen_fast.quantize_experts on a copy of the model: fp8
with 128 x 128 block scales, or int8 per channel) and gives transformers' side the same weights dequantized to the
model dtype, which is what transformers does with an 8-bit checkpoint on CPU: both sides compute with the same
values, and qwen_fast reads half the bytes of bf16 experts (a quarter of fp32 ones) per token.
"""

import argparse
import copy
import os
import statistics
import time
from collections import Counter

import torch

import qwen_fast
from qwen_fast.configs.models import SMALL_QWEN3_MOE, config_kwargs
from qwen_fast.nn import MoEExperts
from qwen_fast.nn.experts import FORMATS
from qwen_fast.reference.quant import dequantize

# op -> the part of the model it serves, as printed
PARTS = {
    "fused_topk": "routing (softmax top-k)",
    "fused_experts": "experts (grouped GEMMs + SwiGLU + combine)",
    "moe_align_block_size": "experts: sort tokens by expert",
    "qk_norm_rope_and_cache": "q/k RMSNorm + RoPE + KV-cache write",
    "rotary_embedding": "RoPE",
    "reshape_and_cache": "KV-cache write",
    "flash_attn_func": "attention over given K/V (prefill, gathered pages)",
    "flash_attn_varlen_func": "attention (padded batch)",
    "flash_attn_with_kvcache": "attention over the paged cache",
}
# A ratio of medians within this fraction of 1 reads as "no clear difference" (the demo model's steps are
# milliseconds: thread wake-ups and other jobs move a single round by more).
SAME = 0.05


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="transformers vs qwen_fast.patch on one model", description=__doc__)
    parser.add_argument("--model", metavar="PATH", help="a local transformers checkpoint (default: embedded config)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable; needs the checkpoint's tokenizer)")
    parser.add_argument("--batch", type=int, default=4, help="random prompts when no --prompt (default 4)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per random prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each side, alternating (default 3)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per page of the paged KV cache")
    parser.add_argument("--backend", choices=["auto", "cuda", "triton", "cpu", "torch"], default="auto",
                        help="force one backend for qwen_fast's ops (qwen_fast.use_backend)")  # fmt: skip
    parser.add_argument(
        "--experts",
        choices=["model", *FORMATS],
        default="model",
        help="qwen_fast's experts: the model's own (default), or quantized to fp8 / int8 (see above)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def fail(message: str) -> SystemExit:
    return SystemExit(f"qwen-fast demo: {message}")


def run(args: argparse.Namespace) -> int:
    device, dtype = _check_arguments(args)
    torch.manual_seed(args.seed)
    model, tokenizer, described = _load(args.model, device, dtype)
    prompts, mask = _prompts(args, model, tokenizer, device)
    fast_model, experts = _experts_side(model, args.experts)
    handle = _check_patch(fast_model)
    paged = _paged_cache_problem(model.config)
    print(f"model: {described}; {str(dtype).removeprefix('torch.')} on {device}, {torch.get_num_threads()} threads")
    batch, length = prompts.shape
    print(f"prompts: {batch} x {length} tokens; generating {args.new_tokens} tokens each (greedy), {args.rounds} "
          "timed rounds per side, alternating")  # fmt: skip
    print(f"\n[unpatched] transformers ({_implementations(model)}, DynamicCache)")
    print(f"[patched]   qwen_fast.patch({type(model).__name__}){experts}:")
    lines = [f"patched: {x}" for x in handle.patched] + [f"not patched: {x}" for x in handle.not_patched]
    print("".join(f"              {line}\n" for line in lines), end="")
    if paged is None:
        print(f"            with a PagedKVCache (block size {args.block_size})")
    else:
        print(f"            with transformers' DynamicCache: {paged}")

    cache, results, calls = None, {"unpatched": [], "patched": []}, []
    for round_ in range(args.rounds):  # alternating, each side first every other round; round 0 warms up first
        for side in ("unpatched", "patched") if round_ % 2 == 0 else ("patched", "unpatched"):
            if side == "unpatched":
                results[side].append(_generate(model, prompts, mask, args.new_tokens, None, warm=round_ == 0))
                continue
            handle = qwen_fast.patch(fast_model)
            try:
                if cache is None and paged is None:  # built for the patched model: it then reads pages in place
                    cache = qwen_fast.PagedKVCache.for_model(fast_model, max_batch=batch, block_size=args.block_size,
                                                             max_seq_len=length + args.new_tokens)  # fmt: skip
                with qwen_fast.use_backend(args.backend), qwen_fast.record_backends() as calls:
                    results[side].append(_generate(fast_model, prompts, mask, args.new_tokens, cache, warm=round_ == 0))
            finally:
                handle.undo()
    print("\nbackends in one patched generation (part: op, backend x calls):")
    for (op, backend), count in sorted(Counter(calls).items()):
        print(f"  {PARTS.get(op, op):47s} {op:24s} {backend:6s} x {count}")
    base, fast = results["unpatched"], results["patched"]
    _report(base[0], fast[0], [r[2] for r in base], [r[2] for r in fast], tokenizer, dtype)
    return 0


def _check_arguments(args: argparse.Namespace) -> tuple[str, torch.dtype]:
    """(device, dtype), or SystemExit saying what cannot run, before anything is loaded or generated."""
    for name in ("batch", "prompt_len", "new_tokens", "block_size", "rounds"):
        if getattr(args, name) < 1:
            raise fail(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise fail("it needs transformers: pip install 'qwen-fast[hf]'") from None
    if args.model is not None:
        if not os.path.isdir(args.model):
            raise fail(f"--model {args.model!r} is not a directory (a local checkpoint; nothing is downloaded)")
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            raise fail(f"--model {args.model!r} is not a transformers checkpoint: it has no config.json")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise fail("--device cuda, but torch sees no CUDA device")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = (
        (torch.bfloat16 if device == "cuda" else torch.float32) if args.dtype == "auto" else getattr(torch, args.dtype)
    )
    if args.backend == "cuda" and device != "cuda":
        raise fail("--backend cuda needs a CUDA device (and --device cuda); torch sees none" if not
                   torch.cuda.is_available() else "--backend cuda needs --device cuda")  # fmt: skip
    if args.backend != "auto":
        problems = {
            name: op.problem(args.backend, torch.device(device), dtype) for name, op in qwen_fast.ops.OPS.items()
        }
        problems = {name: why for name, why in problems.items() if why is not None and name in PARTS}
        if problems:
            lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
            raise fail(f"--backend {args.backend} cannot run these ops on {device} {dtype} here:\n{lines}")
    return device, dtype


def _check_patch(model) -> "qwen_fast.PatchHandle":
    """What qwen_fast.patch would do (patched and undone at once), or SystemExit when there is nothing to patch."""
    try:
        handle = qwen_fast.patch(model)
    except ValueError as error:
        raise fail(str(error)) from None
    handle.undo()
    return handle


def _experts_side(model, experts: str) -> tuple:
    """(the model qwen_fast's side runs, how its experts are described): `model` itself for --experts model; else a
    copy with quantize_experts(copy, experts), and `model`'s own experts overwritten with those weights dequantized
    to the model dtype (transformers' side then computes with the same values)."""
    if experts == "model":
        return model, ""
    fast = copy.deepcopy(model)
    try:
        qwen_fast.quantize_experts(fast, experts)
    except ValueError as error:
        raise fail(f"--experts {experts}: {error}") from None
    dtype, total = next(model.parameters()).dtype, [0, 0]
    with torch.no_grad():
        for name, module in fast.named_modules():
            if isinstance(module, MoEExperts):
                own = model.get_submodule(name)
                for weight in ("gate_up_proj", "down_proj"):
                    w, scale = getattr(module, weight), getattr(module, f"{weight}_scale_inv")
                    getattr(own, weight).copy_(dequantize(w, scale, module.block_size).to(dtype))
                    total[0] += w.numel() * w.element_size() + scale.numel() * scale.element_size()
                    total[1] += w.numel() * dtype.itemsize
    layout = "per-channel scales" if experts == "int8" else "128 x 128 blocks"
    return fast, (
        f" with {experts} experts ({layout}; {total[0] / 2**20:.1f} MiB of weights and scales against "
        f"{total[1] / 2**20:.1f} MiB in {str(dtype).removeprefix('torch.')}; transformers' side runs them dequantized)"
    )


def _paged_cache_problem(config) -> str | None:
    """Why the model cannot use a PagedKVCache (one head dim for K and V, full-attention layers), or None."""
    config = config.get_text_config(decoder=True)
    if getattr(config, "kv_lora_rank", None) is not None:
        k_dim = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0)
        return (
            f"multi-head latent attention (K head dim {k_dim}, V head dim {getattr(config, 'v_head_dim', '?')}) "
            "is not implemented and the paged cache holds one head dim for K and V: qwen_fast runs the MoE blocks only"
        )
    kinds = set(getattr(config, "layer_types", None) or ())
    if kinds - {"full_attention"} or (not kinds and getattr(config, "sliding_window", None) is not None):
        return "sliding-window layers, which the paged cache does not hold"
    return None


def _implementations(model) -> str:
    """transformers' experts (where the model has experts) and attention implementations."""
    config = model.config
    experts = any(getattr(config, name, None) for name in ("num_experts", "num_local_experts", "n_routed_experts"))
    attention = f"attention {config._attn_implementation}"
    return f"experts {config._experts_implementation}, {attention}" if experts else attention


def _load(path: str | None, device: str, dtype: torch.dtype):
    """(model, tokenizer or None, description) from a local checkpoint or the embedded config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    if path is None:
        config = Qwen3MoeConfig(**config_kwargs(SMALL_QWEN3_MOE))
        with torch.device(device):
            model = Qwen3MoeForCausalLM(config).to(dtype).eval()
        described = f"embedded small Qwen3-MoE ({SMALL_QWEN3_MOE}, random weights)"
        tokenizer = None
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
        except (OSError, ValueError, KeyError) as error:
            first = (str(error).splitlines() or [""])[0]
            raise fail(f"--model {path!r}: transformers cannot load it as a causal LM ({type(error).__name__}: "
                       f"{first})") from None  # fmt: skip
        described = f"{path} ({type(model).__name__})"
        # Only a tokenizer saved with the checkpoint: transformers builds an empty one from the config otherwise.
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        has_tokenizer = any(os.path.exists(os.path.join(path, name)) for name in files)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    config = model.config
    size = sum(p.numel() for p in model.parameters()) / 1e6
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    experts = experts or getattr(config, "n_routed_experts", None)
    shape = f"{config.num_hidden_layers} layers, hidden {config.hidden_size}"
    if experts:
        shape += f", {experts} experts top-{config.num_experts_per_tok}"
    return model, tokenizer, f"{described}: {shape}, {size:.1f}M parameters"


def _prompts(args, model, tokenizer, device: str):
    """(token ids [B, S], attention mask [B, S] or None): the --prompt texts, else seeded random ids."""
    if args.prompt:
        if tokenizer is None:
            raise SystemExit("qwen-fast demo: --prompt needs a checkpoint with a tokenizer (--model PATH)")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        encoded = tokenizer(args.prompt, return_tensors="pt", padding=True).to(device)
        mask = encoded["attention_mask"]
        return encoded["input_ids"], None if bool(mask.all()) else mask
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(min(3, vocab - 1), vocab, (args.batch, args.prompt_len), device=device)
    return ids, None


def _generate(model, prompts, mask, new_tokens: int, cache, warm: bool):
    """(tokens [B, new_tokens], per-step logits [new_tokens, B, V], tokens/s); `warm`: first a short untimed
    generation (one-time costs: compilation, allocation)."""
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    with torch.no_grad():
        if warm:
            model.generate(prompts, max_new_tokens=2, cache=_fresh(cache), **kwargs)
        _sync(prompts.device)
        start = time.perf_counter()
        out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache=_fresh(cache),
                             return_dict_in_generate=True, output_logits=True, **kwargs)  # fmt: skip
        _sync(prompts.device)
        seconds = time.perf_counter() - start
    tokens = out.sequences[:, prompts.shape[1] :]
    return tokens, torch.stack(out.logits).float(), tokens.numel() / seconds


def _fresh(cache):
    if cache is not None:
        cache.reset()
    return cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reading(base_rates: list[float], fast_rates: list[float]) -> str:
    """One line: the ratio of the median tokens/s and whether the rounds separate the two sides."""
    ratio = statistics.median(fast_rates) / statistics.median(base_rates)
    overlap = min(fast_rates) <= max(base_rates) and min(base_rates) <= max(fast_rates)
    if abs(ratio - 1) <= SAME or (overlap and len(fast_rates) > 1):
        return f"{ratio:.2f}x: no clear difference at this size (the rounds overlap); try more --rounds or tokens"
    faster = "faster" if ratio > 1 else "slower"
    return f"qwen_fast is {ratio:.2f}x transformers' speed ({faster}; every round of one side beat the other's)"


def _rates(rates: list[float]) -> str:
    return f"median {statistics.median(rates):.1f} (range {min(rates):.1f}-{max(rates):.1f})"


def _report(base, fast, base_rates, fast_rates, tokenizer, dtype: torch.dtype) -> None:
    (base_tokens, base_logits, _), (fast_tokens, fast_logits, _) = base, fast
    same = base_tokens == fast_tokens
    diverged = (~same).any(dim=0).nonzero()
    steps = int(diverged[0]) + 1 if len(diverged) else same.shape[1]  # logits compared while the inputs agree
    diff = (base_logits[:steps] - fast_logits[:steps]).abs().max().item()
    scale = base_logits[:steps].abs().max().item()
    name = str(dtype).removeprefix("torch.")
    print("\nresults:")
    print(f"  max |logit difference| against the unpatched run, first {steps} steps: {diff:.3e} ({name}; largest "
          f"|logit| {scale:.3g})")  # fmt: skip
    print(f"  generated tokens: {int(same.sum())}/{same.numel()} identical "
          f"({int(same.all(dim=1).sum())}/{same.shape[0]} sequences identical)")  # fmt: skip
    if dtype != torch.float32:
        print(f"  in {name} the two sides round differently (qwen_fast's kernels accumulate in fp32 and round once; "
              "transformers rounds between ops): the logit difference is measured against the unpatched "
              f"{name} run, not an exact answer, and with random weights the top logits are near ties, so one "
              "rounding can flip a greedy token and the sequence then diverges")  # fmt: skip
    print(f"  tokens/s over {len(base_rates)} alternating rounds, {torch.get_num_threads()} threads: transformers "
          f"{_rates(base_rates)}, qwen_fast {_rates(fast_rates)}")  # fmt: skip
    print(f"  reading: {reading(base_rates, fast_rates)}")
    if tokenizer is not None:
        for row in fast_tokens[:4]:
            print(f"  qwen_fast: {tokenizer.decode(row, skip_special_tokens=True)!r}")
