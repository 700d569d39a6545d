"""`qwen-fast demo`: the same prompts through transformers, unpatched and patched by qwen_fast, side by side.

Builds the embedded small Qwen3-MoE (qwen_fast/configs/models/qwen3_moe_small.json, seeded random weights) or loads a
local checkpoint (--model PATH; never downloads), generates greedily for a batch of prompts (random token ids, or
--prompt texts when the checkpoint has a tokenizer) with the unpatched model and transformers' default cache, then with
`qwen_fast.patch(model)` and a `qwen_fast.PagedKVCache`, and prints which backend ran each part, the largest logit
difference, whether the generated tokens agree and tokens/s for both.
"""

import argparse
import os
import time
from collections import Counter

import torch

import qwen_fast
from qwen_fast.configs.models import SMALL_QWEN3_MOE, config_kwargs

# op -> the part of the model it serves, as printed
PARTS = {
    "fused_topk": "routing (softmax top-k)",
    "fused_experts": "experts (grouped GEMMs + SwiGLU + combine)",
    "moe_align_block_size": "experts: sort tokens by expert",
    "qk_norm_rope_and_cache": "q/k RMSNorm + RoPE + KV-cache write",
    "rotary_embedding": "RoPE",
    "reshape_and_cache": "KV-cache write",
    "flash_attn_func": "attention (prefill, over the new rows)",
    "flash_attn_varlen_func": "attention (padded batch)",
    "flash_attn_with_kvcache": "attention over the paged cache",
}


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="transformers vs qwen_fast.patch on one model", description=__doc__)
    parser.add_argument("--model", metavar="PATH", help="a local transformers checkpoint (default: embedded config)")
    parser.add_argument("--prompt", action="append", help="prompt text (repeatable; needs the checkpoint's tokenizer)")
    parser.add_argument("--batch", type=int, default=4, help="random prompts when no --prompt (default 4)")
    parser.add_argument("--prompt-len", type=int, default=32, help="tokens per random prompt (default 32)")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                        help="auto: bfloat16 on CUDA, float32 on CPU")  # fmt: skip
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per page of the paged KV cache")
    parser.add_argument("--backend", choices=["auto", "cuda", "triton", "cpu", "torch"], default="auto",
                        help="force one backend for qwen_fast's ops (qwen_fast.use_backend)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "prompt_len", "new_tokens", "block_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"qwen-fast demo: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise SystemExit("qwen-fast demo needs transformers: pip install 'qwen-fast[hf]'") from None
    if args.model is not None and not os.path.isdir(args.model):
        raise SystemExit(f"qwen-fast demo: --model {args.model!r} is not a directory (a local checkpoint; nothing is "
                         "downloaded)")  # fmt: skip
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("qwen-fast demo: --device cuda, but torch sees no CUDA device")
    default_dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dtype = default_dtype if args.dtype == "auto" else getattr(torch, args.dtype)
    torch.manual_seed(args.seed)

    model, tokenizer, described = _load(args.model, device, dtype)
    prompts, mask = _prompts(args, model, tokenizer, device)
    print(f"model: {described}; {str(dtype).removeprefix('torch.')} on {device}")
    batch, length = prompts.shape
    print(f"prompts: {batch} x {length} tokens; generating {args.new_tokens} tokens each (greedy)\n")

    print(f"[1/2] transformers, unpatched (experts {model.config._experts_implementation}, attention "
          f"{model.config._attn_implementation}, DynamicCache)")  # fmt: skip
    base = _generate(model, prompts, mask, args.new_tokens, cache=None)
    handle = qwen_fast.patch(model)
    cache = qwen_fast.PagedKVCache.for_model(
        model, max_batch=prompts.shape[0], block_size=args.block_size, max_seq_len=prompts.shape[1] + args.new_tokens
    )
    print(f"\n[2/2] {handle.summary()}\n      with a PagedKVCache (block size {args.block_size})")
    try:
        with qwen_fast.use_backend(args.backend), qwen_fast.record_backends() as calls:
            fast = _generate(model, prompts, mask, args.new_tokens, cache=cache)
    finally:
        handle.undo()

    print("\nbackends (op: backend x calls):")
    for (op, backend), count in sorted(Counter(calls).items()):
        print(f"  {PARTS.get(op, op):44s} {op:24s} {backend:6s} x {count}")
    _report(base, fast, tokenizer, dtype)
    return 0


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
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).to(device).eval()
        described = f"{path} ({type(model).__name__})"
        # Only a tokenizer saved with the checkpoint: transformers builds an empty one from the config otherwise.
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        has_tokenizer = any(os.path.exists(os.path.join(path, name)) for name in files)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    config = model.config
    size = sum(p.numel() for p in model.parameters()) / 1e6
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
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


def _generate(model, prompts, mask, new_tokens: int, cache):
    """(tokens [B, new_tokens], per-step logits [new_tokens, B, V], tokens/s), timed after a short warm-up."""
    from tqdm.auto import tqdm
    from transformers import LogitsProcessor, LogitsProcessorList

    class Progress(LogitsProcessor):
        def __call__(self, input_ids, scores):
            bar.update(1)
            return scores

    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=model.config.pad_token_id or 0)
    with torch.no_grad():
        model.generate(prompts, max_new_tokens=2, cache=_fresh(cache), **kwargs)  # warm-up: one-time costs
        with tqdm(total=new_tokens, unit="step", desc="      generating", leave=True) as bar:
            _sync(prompts.device)
            start = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache=_fresh(cache),
                                 return_dict_in_generate=True, output_logits=True,
                                 logits_processor=LogitsProcessorList([Progress()]), **kwargs)  # fmt: skip
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


def _report(base, fast, tokenizer, dtype: torch.dtype) -> None:
    (base_tokens, base_logits, base_rate), (fast_tokens, fast_logits, fast_rate) = base, fast
    same = base_tokens == fast_tokens
    diverged = (~same).any(dim=0).nonzero()
    steps = int(diverged[0]) + 1 if len(diverged) else same.shape[1]  # logits compared while the inputs agree
    diff = (base_logits[:steps] - fast_logits[:steps]).abs().max().item()
    print("\nresults:")
    print(f"  max |logit difference|, first {steps} steps: {diff:.3e} ({str(dtype).removeprefix('torch.')})")
    print(f"  generated tokens: {int(same.sum())}/{same.numel()} identical "
          f"({int(same.all(dim=1).sum())}/{same.shape[0]} sequences identical)")  # fmt: skip
    print(f"  throughput: transformers {base_rate:.1f} tokens/s, qwen_fast {fast_rate:.1f} tokens/s "
          f"({fast_rate / base_rate:.2f}x)")  # fmt: skip
    if tokenizer is not None:
        for row in fast_tokens[:4]:
            print(f"  qwen_fast: {tokenizer.decode(row, skip_special_tokens=True)!r}")
