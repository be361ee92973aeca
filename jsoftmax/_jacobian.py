r"""Explicit derivatives of softmax: dense Jacobians, single partials, the diagonal,
Jacobian-free products and second-order pieces.

All of them are built from the formulas in `jsoftmax._formulas` (never by
autodiff), over one softmax `axis`. Dense results put the batch shape (the input's
shape without `axis`, in order) first and the derivative indices last.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas
from jsoftmax._softmax import log_softmax, softmax


def _probs(p: ArrayLike, axis, name: str = "p") -> tuple[jax.Array, int]:
    p = _checks.as_float_array(p, name)
    return p, _checks.canonical_axis(axis, p.ndim)


def _to_last(a: jax.Array, axis: int) -> jax.Array:
    return jnp.moveaxis(a, axis, -1)


def _compute(p: jax.Array) -> jax.Array:
    return p.astype(_checks.accumulation_dtype(p.dtype))


def jacobian_from_probs(p: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Dense softmax Jacobian from probabilities: $J = \mathrm{diag}(p) - pp^\top$.

    $$
    J_{ij} = \frac{\partial p_i}{\partial z_j} = p_i(\delta_{ij} - p_j)
    $$

    Args:
      p: probabilities (a softmax output), any rank >= 1.
      axis: the softmax axis of `p`.

    Returns:
      Array of shape `batch + (n, n)` where `batch` is `p.shape` without
      `axis`; `[..., i, j]` is $\partial p_i/\partial z_j$. It is symmetric,
      its rows and columns sum to 0 and it is positive semi-definite. Built in one
      fused pass over the `n*n` outputs.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> with jnp.printoptions(precision=4):
      ...     print(jsoftmax.jacobian_from_probs(jnp.array([0.25, 0.75])))
      [[ 0.1875 -0.1875]
       [-0.1875  0.1875]]
    """
    p, axis = _probs(p, axis)
    return _formulas.dense_jacobian(_compute(_to_last(p, axis))).astype(p.dtype)


def jacobian(x: ArrayLike, axis: int = -1, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Dense Jacobian of [`jsoftmax.softmax`][] with respect to the logits.

    Built explicitly from $J = \mathrm{diag}(p) - pp^\top$ with
    $p = \mathrm{softmax}(x)$, not by automatic differentiation; it equals
    `jax.jacfwd` / `jax.jacrev` of the softmax, arranged per batch row.

    Args:
      x: logits, any rank >= 1.
      axis: the softmax axis.
      where: optional boolean mask broadcastable to `x`; masked components have
        $p_i = 0$, so their rows and columns of `J` are zero.

    Returns:
      Array of shape `batch + (n, n)` with `[..., i, j]` =
      $\partial p_i / \partial x_j$.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> J = jsoftmax.jacobian(jnp.zeros((3, 2)))   # batch of 3 rows, n = 2
      >>> J.shape
      (3, 2, 2)
      >>> print(J[0])
      [[ 0.25 -0.25]
       [-0.25  0.25]]
    """
    x = _checks.as_float_array(x)
    ax = _checks.canonical_axis(axis, x.ndim)
    return jacobian_from_probs(softmax(x, ax, where=where, rule="jvp"), ax)


def jacobian_diagonal(p: ArrayLike, axis: int = -1) -> jax.Array:
    r"""The diagonal of the softmax Jacobian, $\partial p_i/\partial z_i = p_i(1 - p_i)$.

    This is **only the diagonal** of $J = \mathrm{diag}(p) - pp^\top$, not "the
    gradient of softmax": softmax is vector-valued, so its derivative is the whole
    matrix, and the off-diagonal entries $-p_ip_j$ matter for any loss that
    is not separable. Using `p * (1 - p)` elementwise in backpropagation is wrong
    unless the loss makes the off-diagonal terms cancel. Note also that the gradient
    of $\sum_i p_i$ (which is identically 1) is identically 0: the columns of
    `J` sum to zero.

    Args:
      p: probabilities, any rank >= 1.
      axis: the softmax axis of `p`.

    Returns:
      Array with the shape of `p`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> print(jsoftmax.jacobian_diagonal(jnp.array([0.25, 0.75])))
      [0.1875 0.1875]
    """
    p, axis = _probs(p, axis)
    pc = _compute(p)
    return (pc * (1 - pc)).astype(p.dtype)


def partial_derivative(p: ArrayLike, i, j, axis: int = -1) -> jax.Array:
    r"""One entry of the softmax Jacobian.

    $$
    \frac{\partial p_i}{\partial z_j} = p_i(\delta_{ij} - p_j)
    $$

    `i` indexes the output component and `j` the input component.

    Args:
      p: probabilities, any rank >= 1.
      i: output index, a Python int or integer array broadcastable to the batch shape
        (negative counts from the end).
      j: input index, likewise.
      axis: the softmax axis of `p`.

    Returns:
      Array with the batch shape (`p.shape` without `axis`).

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> p = jnp.array([0.25, 0.75])
      >>> print(jsoftmax.partial_derivative(p, 0, 0), jsoftmax.partial_derivative(p, 0, 1))
      0.1875 -0.1875
    """
    p, axis = _probs(p, axis)
    n = p.shape[axis]
    i = _checks.check_index(i, n, "i")
    j = _checks.check_index(j, n, "j")
    pc = _compute(_to_last(p, axis))
    batch = pc.shape[:-1]

    for name, k in (("i", i), ("j", j)):
        shape = jnp.shape(k)
        if not _checks.broadcasts_to(shape, batch):
            raise ValueError(
                f"index {name} of shape {shape} does not broadcast to the batch shape {batch} "
                f"(p's shape {p.shape} without axis {axis})."
            )

    def take(k):
        k = jnp.broadcast_to(jnp.asarray(k), batch)
        return jnp.take_along_axis(pc, k[..., None], axis=-1)[..., 0]

    p_i, p_j = take(i), take(j)
    delta = (jnp.asarray(i) == jnp.asarray(j)).astype(pc.dtype)
    return (p_i * (delta - p_j)).astype(p.dtype)


def _product(p, v, axis, name):
    p, axis = _probs(p, axis)
    v = _checks.as_float_array(v, name)
    _checks.check_same_shape(p, v, "p", name)
    cdt = jnp.promote_types(_checks.accumulation_dtype(p.dtype), v.dtype)
    out = _formulas.jac_product(p.astype(cdt), v.astype(cdt), (axis,))
    return out.astype(jnp.promote_types(p.dtype, v.dtype))


def softmax_jvp(p: ArrayLike, t: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Jacobian-vector product $Jt = p\odot(t - \langle p, t\rangle)$ in O(n).

    The forward-mode derivative of softmax in direction `t` without forming `J`.

    Args:
      p: probabilities, any rank >= 1.
      t: tangent of the logits, same shape as `p`.
      axis: the softmax axis.

    Returns:
      The tangent of the probabilities, shape of `p`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> print(jsoftmax.softmax_jvp(jnp.array([0.25, 0.75]), jnp.array([1.0, 0.0])))
      [ 0.1875 -0.1875]
    """
    return _product(p, t, axis, "t")


def softmax_vjp(p: ArrayLike, g: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Vector-Jacobian product $g^\top J = p\odot(g - \langle g, p\rangle)$ in O(n).

    The reverse-mode derivative: what `rule="vjp"` runs in its backward pass, with `g`
    the cotangent $\partial L/\partial p$ arriving from the rest of the computation.
    Because $J$ is symmetric it is the same formula as
    [`softmax_jvp`][jsoftmax.softmax_jvp]; a `g` that is constant along the axis gives
    0 (the rows of $J$ sum to 0).

    Args:
      p: probabilities, any rank >= 1.
      g: $\partial L/\partial p$, same shape as `p`.
      axis: the softmax axis.

    Returns:
      $\partial L/\partial z$, shape of `p`: row `i` of $J$ for `g` the `i`-th unit
      vector, as the example shows.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> p = jnp.array([0.25, 0.75])
      >>> row = jsoftmax.softmax_vjp(p, jnp.array([0.0, 1.0]))
      >>> print(row, jsoftmax.jacobian_from_probs(p)[1])
      [-0.1875  0.1875] [-0.1875  0.1875]
    """
    return _product(p, g, axis, "g")


def log_softmax_jacobian(
    x: ArrayLike, axis: int = -1, *, where: ArrayLike | None = None
) -> jax.Array:
    r"""Dense Jacobian of [`jsoftmax.log_softmax`][]: $I - 1p^\top$.

    $$
    \frac{\partial \log p_i}{\partial z_j} = \delta_{ij} - p_j
    $$

    Rows of masked (or `-inf`) components are zero: those outputs are the constant
    `-inf`.

    Returns:
      Array of shape `batch + (n, n)`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> print(jsoftmax.log_softmax_jacobian(jnp.zeros(2)))
      [[ 0.5 -0.5]
       [-0.5  0.5]]
    """
    x = _checks.as_float_array(x)
    ax = _checks.canonical_axis(axis, x.ndim)
    y = _compute(_to_last(log_softmax(x, ax, where=where, rule="jvp"), ax))
    # A NaN output is live (its row is NaN), only a -inf output is a constant.
    return _formulas.dense_log_jacobian(jnp.exp(y), y != -jnp.inf).astype(x.dtype)


def hessian(x: ArrayLike, axis: int = -1, *, where: ArrayLike | None = None) -> jax.Array:
    r"""Explicit second derivative of softmax, a third-order tensor.

    $$
    H_{ijk} = \frac{\partial^2 p_i}{\partial z_j \partial z_k}
    = p_i(\delta_{ij} - p_j)(\delta_{ik} - p_k) - p_i p_j(\delta_{jk} - p_k)
    $$

    Equal to `jax.hessian(lambda z: softmax(z, rule="jvp"))` per row. Costs
    $O(n^3)$ memory; prefer [`softmax_hvp`][jsoftmax.softmax_hvp] for products.

    Returns:
      Array of shape `batch + (n, n, n)`, `[..., i, j, k]` as above.
    """
    x = _checks.as_float_array(x)
    ax = _checks.canonical_axis(axis, x.ndim)
    p = _compute(_to_last(softmax(x, ax, where=where, rule="jvp"), ax))
    return _formulas.dense_hessian(p).astype(x.dtype)


def softmax_hvp(p: ArrayLike, u: ArrayLike, v: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Second directional derivative $\sum_{jk} H_{ijk}u_jv_k$ in O(n).

    With $\bar a = \langle p, a\rangle$:

    $$
    p_i(u_i - \bar u)(v_i - \bar v) - p_i(\overline{uv} - \bar u\bar v)
    $$

    This is $\frac{d}{d\epsilon} J(z + \epsilon v)\,u$ at $\epsilon = 0$,
    symmetric in `u` and `v`.

    Args:
      p: probabilities, any rank >= 1.
      u: a direction with the shape of `p`.
      v: a second direction with the shape of `p`.
      axis: the softmax axis.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jsoftmax
      >>> p = jnp.array([0.25, 0.75]); e0 = jnp.array([1.0, 0.0])
      >>> print(jsoftmax.softmax_hvp(p, e0, e0))  # = d^2 p / dz_0^2
      [ 0.09375 -0.09375]
    """
    p, axis = _probs(p, axis)
    u = _checks.as_float_array(u, "u")
    v = _checks.as_float_array(v, "v")
    _checks.check_same_shape(p, u, "p", "u")
    _checks.check_same_shape(p, v, "p", "v")
    cdt = jnp.result_type(_checks.accumulation_dtype(p.dtype), u.dtype, v.dtype)
    out = _formulas.hvp(p.astype(cdt), u.astype(cdt), v.astype(cdt), (axis,))
    return out.astype(jnp.result_type(p.dtype, u.dtype, v.dtype))
