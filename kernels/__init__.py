"""Triton kernels and their launchers, installed as qwen_fast.kernels.

Importing this package needs triton; qwen_fast imports it lazily, so qwen_fast works without triton. Each kernel
module lists, in COMPILE_SPECS, every (signature, constexprs, options) it can launch with, so that
`python -m qwen_fast.gpu_check` compiles all of them for sm_80 and sm_90 without a GPU.
"""
