"""Pure-PyTorch ground truth for every qwen_fast op.

Each function has the name and signature of the public API (see qwen_fast/__init__.py) and is written as the
plainest PyTorch that states the math, with transformers' dtype casts spelled out. These are the specification:
every kernel is tested against them, and they are tested against transformers' own modules.
"""
