"""What the functions of `jsoftmax.sharded` share: argument checks for mesh axes and
for the fused losses' inputs, the global class index of a shard's block and where a
label falls in it, the sums over a split axis, and the casts that make cotangents sum
over the right mesh axes."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jsoftmax import _chunks, _formulas, _kernel, _linear

Axes = tuple[int, ...]
AxisName = str | tuple[str, ...]


def check_axis_name(axis_name, name: str = "axis_name") -> AxisName:
    """A mesh axis name (str) or a non-empty tuple of distinct names, made hashable."""
    if isinstance(axis_name, list):
        axis_name = tuple(axis_name)
    if isinstance(axis_name, str) and axis_name:
        return axis_name
    if (
        isinstance(axis_name, tuple)
        and axis_name
        and all(isinstance(a, str) and a for a in axis_name)
    ):
        if len(set(axis_name)) != len(axis_name):
            raise ValueError(f"{name}={axis_name!r} names the same mesh axis twice.")
        return axis_name[0] if len(axis_name) == 1 else axis_name
    raise TypeError(
        f"{name} must be the name of a mesh axis (a non-empty str) or a non-empty tuple "
        f"of such names, got {axis_name!r}."
    )


def num_shards(
    axis_name: AxisName, fname: str, split: str = "the softmax axis of the input"
) -> int:
    """The number of shards along `axis_name`; a clear error outside shard_map (`split`:
    what the caller splits over the axis)."""
    try:
        return int(lax.axis_size(axis_name))
    except NameError as e:
        raise ValueError(
            f"jsoftmax.sharded.{fname}: axis_name={axis_name!r} is not a mesh axis bound "
            "here. Call it inside jax.shard_map over a mesh that has this axis, with "
            f"{split} sharded over it (for jit-sharded arrays use jsoftmax.{fname} instead)."
        ) from e


def check_num_classes(num_classes, local: int, shards: int) -> int | None:
    """None, or the true class count of a padded split axis (None when not padded)."""
    if num_classes is None:
        return None
    if isinstance(num_classes, (bool, np.bool_)) or not isinstance(num_classes, (int, np.integer)):
        raise TypeError(f"num_classes must be a Python int or None, got {num_classes!r}.")
    total = local * shards
    if not 1 <= int(num_classes) <= total:
        raise ValueError(
            f"num_classes={int(num_classes)} must lie in [1, {total}]: the split axis holds "
            f"{local} classes on each of {shards} shards."
        )
    return None if int(num_classes) == total else int(num_classes)


def offset(local: int, axis_name: AxisName):
    """The global index of this shard's first class."""
    return lax.axis_index(axis_name) * local


def label_layout(labels, local: int, axis_name: AxisName, n_classes: int):
    """`(idx, in_range, limit)` of integer labels `(rows,)`: the label's column in this
    shard's block (`(rows, 1)`, -1: another shard's), whether the global label is in
    range, and the first padded column of the block."""
    start = offset(local, axis_name)
    local_label = labels - start
    here = (local_label >= 0) & (local_label < local)
    idx = jnp.where(here, local_label, -1)[:, None]
    in_range = ((labels >= 0) & (labels < n_classes))[:, None]
    return idx, in_range, n_classes - start


class FusedInputs(NamedTuple):
    """The checked inputs of a fused loss over a vocabulary split across devices."""

    x: jax.Array  # (rows, H), varying over axis_name
    w: jax.Array  # (H, local)
    bias: jax.Array | None  # (local,)
    labels: jax.Array  # (rows,) int32, or int64 under x64
    label_dtype: np.dtype  # the labels' own dtype
    batch: tuple[int, ...]  # x.shape[:-1]
    axis_name: AxisName
    n_classes: int  # the classes over all shards, padding excluded
    size: int  # vocabulary columns per chunk


def fused_inputs(
    x, w_shard, bias_shard, labels, axis_name, num_classes, chunk_size, fname: str, what: str
) -> FusedInputs:
    """Checks the arguments the sharded fused losses share (`what`, e.g. "cross-entropy
    is", names the result in the error for a shard without columns) and flattens the
    rows."""
    axis_name = check_axis_name(axis_name)
    x, w, bias, _ = _linear.check_inputs(
        x, w_shard, bias_shard, 1, w_name="w_shard", bias_name="bias_shard"
    )
    labels = _linear.check_int_labels(labels, x)
    shards = num_shards(axis_name, fname)
    local = w.shape[1]
    if local == 0:
        raise ValueError(f"w_shard has no columns; {what} undefined.")
    num_classes = check_num_classes(num_classes, local, shards)
    batch = x.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    size = _chunks.chunk_size(chunk_size, rows, local)
    x2 = x.reshape(rows, x.shape[-1])
    x2, w, bias = varying((x2, w, bias), axis_tuple(axis_name))
    n_classes = local * shards if num_classes is None else num_classes
    lab = labels.reshape(rows).astype(jnp.result_type(int))  # int64 under x64: no wrap
    return FusedInputs(x2, w, bias, lab, labels.dtype, batch, axis_name, n_classes, size)


def pad_mask(shape, axis: int, axis_name: AxisName, where, num_classes):
    """`where` combined with the mask of padded classes (global index >= num_classes)."""
    if num_classes is None:
        return where
    index = offset(shape[axis], axis_name) + lax.broadcasted_iota(jnp.int32, shape, axis)
    real = index < num_classes
    return real if where is None else jnp.logical_and(where, real)


def global_sum(a: jax.Array, axes: Axes, axis_name: AxisName) -> jax.Array:
    """Sum over the whole split softmax axis: local partial sum, then one all-reduce."""
    return lax.psum(jnp.sum(a, axis=axes, keepdims=True), axis_name)


def global_dot(a: jax.Array, b: jax.Array, axes: Axes, axis_name: AxisName) -> jax.Array:
    """$\\langle a, b\\rangle$ over the whole split axis (the local contraction, then psum)."""
    return lax.psum(_formulas.dot(a, b, axes), axis_name)


def check_data_axis_name(data_axis_name, axis_name, fname: str):
    if data_axis_name is None:
        return None
    name = check_axis_name(data_axis_name, "data_axis_name")
    names = set(name if isinstance(name, tuple) else (name,))
    split = set(axis_name if isinstance(axis_name, tuple) else (axis_name,))
    if names & split:
        raise ValueError(
            f"data_axis_name={data_axis_name!r} must name mesh axes that the rows are split "
            f"over, not the class axis_name={axis_name!r}."
        )
    num_shards(name, fname)
    return name


def reduce(per_row, weight, reduction: str, data_axis_name):
    """`reduction` of the per-row losses; over every row of `data_axis_name` too."""
    if reduction == "none" or data_axis_name is None:
        return _kernel.reduce_rows(per_row, weight, reduction)
    # One all-reduce of two scalars: this block's sum and its total row weight.
    sums = lax.psum((jnp.sum(per_row)[None], jnp.sum(weight)[None]), data_axis_name)
    return _kernel.reduce_rows(sums[0], sums[1], reduction)


def ring_permutation(axis_name: AxisName, shards: int) -> list[tuple[int, int]]:
    """`lax.ppermute`'s pairs sending block `i` of a dimension split over `axis_name`
    (major first, as in the PartitionSpec and `lax.axis_index`) to block `i + 1`, the
    last to the first. `ppermute` numbers the devices of several mesh axes in the
    mesh's order, which need not be `axis_name`'s."""
    names = axis_tuple(axis_name)
    order = tuple(n for n in jax.sharding.get_abstract_mesh().axis_names if n in names)
    if len(order) != len(names) or order == names:  # one name, or already the mesh's order
        return [(i, (i + 1) % shards) for i in range(shards)]
    sizes = {n: int(lax.axis_size(n)) for n in names}

    def device(block: int) -> int:
        coords = {}
        for n in reversed(names):
            block, coords[n] = divmod(block, sizes[n])
        index = 0
        for n in order:
            index = index * sizes[n] + coords[n]
        return index

    return [(device(i), device((i + 1) % shards)) for i in range(shards)]


def axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
    return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def varying(arrays, axis_names):
    """Casts the arrays to vary over the mesh axes any of them (or `axis_names`) varies
    over, so the kernel's cotangents have its inputs' types; autodiff then sums each
    cotangent over the axes its input was cast along (`dx` over the vocabulary axis,
    `dw` over data axes), one all-reduce each."""
    axes = set(axis_names)
    for a in arrays:
        if a is not None:
            axes |= _chunks.varying_axes(a)
    out = []
    for a in arrays:
        if a is not None:
            missing = tuple(sorted(axes - _chunks.varying_axes(a)))
            if missing:
                a = lax.pcast(a, missing, to="varying")
        out.append(a)
    return out
