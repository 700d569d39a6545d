"""Tuned kernel configs as data: optional JSON tables that override a kernel's shape heuristic on one device.

Layout: `<dir>/<kernel>/<device>.json`, e.g. `qwen_fast/configs/moe_gemm/NVIDIA_H100_80GB_HBM3.json`, where
`<device>` is `device_name(device)` (torch.cuda.get_device_name with every run of non-alphanumerics replaced by "_";
"cpu" for CPU tensors, which Triton runs only under TRITON_INTERPRET=1). A file maps a shape key to a table keyed
by the token count T (JSON object keys are strings):

    {"E=128,H=2048,I=768,k=8,dtype=bfloat16": {"1": {<entry>}, "64": {<entry>}, ...}, ...}

What a shape key and an entry hold is the kernel's business: the kernel passes a `validate(shape, entry)` that raises
ValueError, and the loader names the file, shape and T around that message. Directories searched, first hit per
shape key wins: $QWEN_FAST_CONFIG_DIR (if set; one directory), then this package's directory. So a user's own tuned
files take effect without editing the package, for the shapes they cover.

Lookup: the entry of the tuned T nearest to the asked T in log2 (|log2 T - log2 T'|, ties to the smaller T'), since
the best tiles change with the rows per expert, a ratio. A miss (no file, or no such shape key) returns None and logs
one INFO line on the "qwen_fast" logger per (kernel, device, shape): the caller then uses its heuristic. Each file
is read once per process; `clear_cache()` re-reads them (write_entries() calls it).

No tuned tables ship yet: the heuristics are the defaults. bench/tune_moe.py writes tables for moe_gemm.
"""

import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

ENV_DIR = "QWEN_FAST_CONFIG_DIR"
PACKAGE_DIR = Path(__file__).parent
logger = logging.getLogger("qwen_fast")

Validate = Callable[[str, dict], None]


def search_dirs(extra: str | None = None) -> list[Path]:
    """`extra` (default $QWEN_FAST_CONFIG_DIR) when set, then the package's own directory."""
    extra = extra if extra is not None else os.environ.get(ENV_DIR)
    return ([Path(extra)] if extra else []) + [PACKAGE_DIR]


@functools.cache
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    """The file name stem for `device`: "NVIDIA_H100_80GB_HBM3" for an H100 SXM, "cpu" for CPU tensors."""
    if device.type != "cuda":
        return device.type
    index = device.index if device.index is not None else torch.cuda.current_device()
    return re.sub(r"[^A-Za-z0-9]+", "_", _cuda_name(index)).strip("_")


def config_path(directory: Path, kernel: str, device: str) -> Path:
    return Path(directory) / kernel / f"{device}.json"


def _parse(data: object, source: str, validate: Validate) -> dict[str, dict[int, dict]]:
    """{shape key: {T: entry}} from a file's JSON, every entry validated; ValueError naming `source` and the entry."""
    if not isinstance(data, dict):
        raise ValueError(f"tuned config file {source}: must be a JSON object of shape keys, got {type(data).__name__}")
    tables = {}
    for shape, table in data.items():
        if not isinstance(table, dict) or not table:
            raise ValueError(f"tuned config file {source}: [{shape!r}] must be a non-empty object keyed by T")
        tables[shape] = {}
        for tokens, entry in table.items():
            where = f"tuned config file {source}: entry [{shape!r}][{tokens!r}]"
            if not (isinstance(tokens, str) and tokens.isdigit() and int(tokens) >= 1):
                raise ValueError(f"{where}: the key must be a token count T >= 1 written in decimal")
            if not isinstance(entry, dict):
                raise ValueError(f"{where}: must be an object, got {type(entry).__name__}")
            try:
                validate(shape, entry)
            except ValueError as error:
                raise ValueError(f"{where}: {error}") from error
            tables[shape][int(tokens)] = entry
    return tables


@functools.cache
def load_file(path: Path, validate: Validate) -> dict[str, dict[int, dict]]:
    """{shape key: {T: entry}} of one JSON file, validated (cached per path until clear_cache())."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"tuned config file {path}: cannot be read as JSON: {error}") from error
    return _parse(data, str(path), validate)


@functools.cache
def _table(kernel: str, validate: Validate, device: str, shape: str, extra: str) -> tuple[tuple[int, dict], ...] | None:
    """The sorted (T, entry) pairs for a shape from the first directory whose file has it; None (logged) if none."""
    for directory in search_dirs(extra):
        path = config_path(directory, kernel, device)
        if path.is_file() and shape in (tables := load_file(path, validate)):
            return tuple(sorted(tables[shape].items()))
    dirs = ", ".join(str(d) for d in search_dirs(extra))
    logger.info("qwen_fast: no tuned %s config for %s on %s (searched %s): using the heuristic", kernel, shape, device,
                dirs)  # fmt: skip
    return None


def nearest(table: tuple[tuple[int, dict], ...], num_tokens: int) -> dict:
    """The entry whose T is nearest `num_tokens` in log2; ties go to the smaller T."""
    target = math.log2(max(num_tokens, 1))
    return min(table, key=lambda pair: (abs(math.log2(pair[0]) - target), pair[0]))[1]


def lookup(kernel: str, validate: Validate, device: str, shape: str, num_tokens: int) -> dict | None:
    """The tuned entry for (kernel, device, shape) at the T nearest `num_tokens`, or None: use the heuristic.

    Example (no tuned tables ship, so a miss):
        >>> from qwen_fast.kernels.moe_gemm import validate_config
        >>> qwen_fast.configs.lookup("moe_gemm", validate_config, "cpu", "E=8,H=64,I=32,k=2,dtype=float32", 16) is None
        True
    """
    table = _table(kernel, validate, device, shape, os.environ.get(ENV_DIR, ""))
    return None if table is None else nearest(table, num_tokens)


def entries(kernel: str, validate: Validate) -> Iterator[tuple[Path, str, int, dict]]:
    """(file, shape key, T, entry) of every file of `kernel` in the search directories, for every device."""
    for directory in search_dirs():
        for path in sorted((Path(directory) / kernel).glob("*.json")):
            for shape, table in load_file(path, validate).items():
                for tokens, entry in sorted(table.items()):
                    yield path, shape, tokens, entry


def write_entries(path: Path, validate: Validate, shape: str, table: dict[int, dict]) -> None:
    """Merge {T: entry} into `shape` of the JSON file at `path` (created if missing; new T replace old ones).

    The merged contents are validated before anything is written, and the file is replaced atomically."""
    path = Path(path)
    merged = {s: dict(t) for s, t in load_file(path, validate).items()} if path.is_file() else {}
    merged.setdefault(shape, {}).update(table)
    data = {s: {str(t): merged[s][t] for t in sorted(merged[s])} for s in sorted(merged)}
    _parse(data, str(path), validate)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_suffix(".json.tmp")
    scratch.write_text(json.dumps(data, indent=1) + "\n")
    scratch.replace(path)
    clear_cache()


def clear_cache() -> None:
    """Forget the files read so far (and the logged misses): the next lookup reads them again."""
    load_file.cache_clear()
    _table.cache_clear()
