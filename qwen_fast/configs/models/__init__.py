"""Model configs that ship with qwen_fast (transformers config fields as JSON): the small Qwen3-MoE that
`qwen-fast demo` and bench/bench_e2e.py build with random weights."""

import json
from pathlib import Path

SMALL_QWEN3_MOE = "qwen3_moe_small.json"


def config_kwargs(name: str = SMALL_QWEN3_MOE) -> dict:
    """The file's fields as keyword arguments of its transformers config class (model_type and architectures, which
    name the class, left out), e.g. Qwen3MoeConfig(**config_kwargs())."""
    settings = json.loads((Path(__file__).parent / name).read_text())
    return {key: value for key, value in settings.items() if key not in ("model_type", "architectures")}
