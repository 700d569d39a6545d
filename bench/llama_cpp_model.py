"""llama.cpp on bench_e2e.py's random model: the same weights converted to GGUF by llama.cpp's own converter
(F32, BF16 or Q8_0), run through llama-cpp-python on token ids, for bench_e2e's CPU rows.

Needs `pip install llama-cpp-python gguf` and llama.cpp's converter, which neither package installs: point
LLAMA_CPP_DIR at a llama.cpp source tree, a checkout or the `vendor/llama.cpp` folder of llama-cpp-python's source
distribution (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`, then unpack it). Without them
the llama.cpp rows skip and say which is missing.

The random model has no tokenizer, so the converter writes a vocabulary of placeholder pieces, as many as the
model's vocab_size (its Qwen3-MoE converter with `set_vocab` replaced, nothing else), and the bench passes token
ids. Greedy decoding takes the argmax of the last logits row, as the torch rows do.
"""

import atexit
import functools
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

# bench dtype -> (converter file type, the name llama.cpp prints, the K/V cache's ggml type: the activations' dtype,
# as qwen_fast's and transformers' caches hold them; llama.cpp's default would be F16)
FILE_TYPES = {
    "float32": ("ALL_F32", "F32", 0),
    "bfloat16": ("MOSTLY_BF16", "BF16", 30),
    "q8_0": ("MOSTLY_Q8_0", "Q8_0", 30),
}


def missing() -> str | None:
    """Why the llama.cpp rows cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install llama-cpp-python gguf)"
    root = os.environ.get("LLAMA_CPP_DIR")
    if not root or not (Path(root) / "conversion" / "qwen.py").is_file():
        return f"LLAMA_CPP_DIR={root!r} is not a llama.cpp source tree with its converter (conversion/qwen.py)"
    return None


@functools.cache
def _converter():
    """llama.cpp's Qwen3-MoE converter class with a placeholder vocabulary, and its gguf module (the tree's own
    gguf-py first, as its convert_hf_to_gguf.py does)."""
    root = Path(os.environ["LLAMA_CPP_DIR"])
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import gguf
    from conversion.qwen import Qwen3MoeModel

    class TokenIdsOnly(Qwen3MoeModel):
        model_arch = Qwen3MoeModel.model_arch  # the converter requires each class to name its architecture

        def set_vocab(self):  # a SentencePiece-style vocabulary of placeholder pieces, as many as the model's
            size = self.hparams["vocab_size"]
            pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]  # llama.cpp looks up bytes
            kinds = [
                gguf.TokenType.UNKNOWN,
                gguf.TokenType.CONTROL,
                gguf.TokenType.CONTROL,
                *[gguf.TokenType.BYTE] * 256,
            ]
            pieces += [f"<piece{i}>" for i in range(len(pieces), size)]
            kinds += [gguf.TokenType.NORMAL] * (size - len(kinds))
            self.gguf_writer.add_tokenizer_model("llama")
            self.gguf_writer.add_token_list(pieces)
            self.gguf_writer.add_token_scores([0.0] * size)
            self.gguf_writer.add_token_types(kinds)

    return TokenIdsOnly, gguf


@functools.cache
def _files() -> Path:
    """A temporary folder for the saved model and its GGUF files (hundreds of MB), removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="qwen_fast_gguf_"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    return directory


@functools.cache
def gguf_file(model: torch.nn.Module, file_type: str) -> Path:
    """`model` (a transformers Qwen3-MoE) saved and converted to GGUF `file_type` (a FILE_TYPES key), once per run."""
    converter, gguf = _converter()
    directory = _files() / f"model-{id(model)}"
    if not directory.exists():
        model.save_pretrained(directory)
    path = directory / f"{file_type}.gguf"
    converter(directory, getattr(gguf.LlamaFileType, FILE_TYPES[file_type][0]), path).write()
    return path


class Runner:
    """One llama.cpp context on a GGUF file of `file_type` (a FILE_TYPES key): prefill a prompt, then greedy
    decode, on `threads` threads."""

    def __init__(self, path: Path, file_type: str, threads: int, context: int):
        import llama_cpp

        cache_type = FILE_TYPES[file_type][2]
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=context, n_batch=context, n_threads=threads, n_threads_batch=threads,
            type_k=cache_type, type_v=cache_type, verbose=False,
        )  # fmt: skip

    def prefill(self, tokens: list[int]) -> int:
        """Empty the context, evaluate `tokens`; the greedy next token."""
        self.llm.reset()
        self.llm.eval(tokens)
        return self._greedy()

    def decode(self, token: int, steps: int) -> list[int]:
        """`steps` greedy steps from `token` (appended to the context first): the tokens generated."""
        generated = []
        for _ in range(steps):
            self.llm.eval([token])
            token = self._greedy()
            generated.append(token)
        return generated

    def logits(self) -> np.ndarray:
        """The last evaluated position's logits [vocab] (llama.cpp computes no other row; llama-cpp-python's
        `scores` keeps rows only with logits_all)."""
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))

    def _greedy(self) -> int:
        return int(np.argmax(self.logits()))
