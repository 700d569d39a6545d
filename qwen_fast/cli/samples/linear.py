"""Samples of linear: the decode projections at M = 1 .. 16 rows (the cpu kernel's range), 2-D and 3-D inputs, K and
N not multiples of any tile (K = 100, N = 37), with and without bias, K = 0 and M = 0, a column-major weight and a
strided input; weights scaled by K^-1/2 as a model's (outputs of order 1, so fp32's table compares the sums).
"""

from .inputs import Inputs, OpSpec, Sample, relayout, spaced


def _linear(shape, n, bias=False, views=None):
    """input `shape` [*, K], weight [N, K] ~ N(0, 1/K), optional bias [N]; `views(args)` replaces arguments."""

    def build(x: Inputs) -> dict:
        k = shape[-1]
        args = {"input": x.randn(*shape), "weight": x.randn(n, k, scale=max(k, 1) ** -0.5)}
        args["bias"] = x.randn(n) if bias else None
        return args | (views(args) if views else {})

    return build


LINEAR = OpSpec(
    samples=(
        Sample("M1-K64-N96", _linear((1, 64), 96)),
        Sample("M1-K512-N8192-lm-head", _linear((1, 1, 512), 8192)),  # the demo model's LM head at decode
        Sample("M4-K100-N37-bias", _linear((2, 2, 100), 37, bias=True)),
        Sample("M16-K256-N48", _linear((16, 256), 48)),
        Sample("M3-K33-N17-bias", _linear((3, 33), 17, bias=True)),
        Sample("M0-K64-N8", _linear((0, 64), 8)),
        Sample("M2-K0-N8-bias", _linear((2, 0), 8, bias=True)),
        Sample("weight-column-major", _linear((2, 40), 24, views=lambda a: {"weight": relayout(a["weight"], 0, 1)})),
        Sample("input-spaced", _linear((3, 40), 24, bias=True, views=lambda a: {"input": spaced(a["input"])})),
    ),
    compiles_reference=True,
    opcheck=("M4-K100-N37-bias",),
)
