"""Group `torch` (only when PyTorch is installed): `torch.softmax` on the CPU as an
outside reference, forward and forward + backward."""

from __future__ import annotations

from functools import partial

import jax
import numpy as np

import jsoftmax
from jsoftmax.tools.bench import _timing
from jsoftmax.tools.bench._fwd_bwd import value_and_vjp
from jsoftmax.tools.bench._timing import F32, FORWARD_SHAPES, Case, Ctx, Group, Row

GROUPS: tuple[Group, ...] = ("torch",)


def torch_softmax(ctx: Ctx, shape, backward: bool) -> list[Row]:
    import torch  # pyright: ignore[reportMissingImports] - optional, not a dependency

    x = _timing.logits(shape, F32)
    g = _timing.logits(shape, F32, seed=1)
    xt = torch.from_numpy(np.array(x))
    gt = torch.from_numpy(np.array(g))
    if backward:
        cand = value_and_vjp(jsoftmax.softmax)

        def base_vjp():
            xr = xt.detach().requires_grad_(True)
            y = torch.softmax(xr, dim=-1)
            y.backward(gt)
            return y, xr.grad

        fns = {"base": base_vjp, "cand": lambda: cand(x, g)}
    else:
        cand = jax.jit(jsoftmax.softmax)

        def base_value():
            with torch.no_grad():
                return torch.softmax(xt, dim=-1)

        fns = {"base": base_value, "cand": lambda: cand(x)}

    t = _timing.time_interleaved(fns, ctx.repeats, ctx.min_sample_s)
    what = "value + vjp" if backward else "softmax"
    return [
        _timing.timing_row(
            "torch",
            f"{what} {_timing.shape_str(shape)} float32",
            "jsoftmax.softmax",
            f"torch.softmax (torch {torch.__version__}, CPU)",
            t["cand"],
            t["base"],
            shape=shape,
            dtype=F32,
        )
    ]


def cases(quick: bool) -> list[Case]:
    if not _timing.installed("torch"):
        return []
    shapes = FORWARD_SHAPES[:1] if quick else FORWARD_SHAPES
    return [
        Case("torch", f"torch {s}", partial(torch_softmax, shape=s, backward=backward))
        for s in shapes
        for backward in (False, True)
    ]
