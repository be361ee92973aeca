r"""`SoftmaxJacobian`: the softmax Jacobian $J = \mathrm{diag}(p) - pp^\top$ as a
structured operator.

The operator stores only the probabilities `p` (and an optional per-row `scale`),
so it costs the memory of `p` and multiplies in $O(n)$. It is a JAX pytree:
it can be passed through and returned from `jax.jit`, mapped with
`jax.vmap` and differentiated with `jax.grad`. Every product is
`jsoftmax._formulas.jac_product`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from jsoftmax import _checks, _formulas, _jacobian
from jsoftmax._softmax import softmax


def _compute_dtype(*dtypes) -> np.dtype:
    return np.dtype(jnp.result_type(*[_checks.accumulation_dtype(d) for d in dtypes]))


@jax.tree_util.register_pytree_node_class
class SoftmaxJacobian:
    r"""The softmax Jacobian $J = s\,(\mathrm{diag}(p) - pp^\top)$ as an operator.

    $$
    J_{ij} = \frac{\partial p_i}{\partial z_j} = s\, p_i(\delta_{ij} - p_j)
    $$

    One operator holds one $n \times n$ matrix per batch row: `p` has any
    rank, `axis` is its softmax axis (length `n`) and the remaining axes are the
    batch. The optional `scale` $s$ (default 1) turns the operator into the
    Hessian of a cross-entropy (see [`jsoftmax.cross_entropy_hessian`][]).

    Construct it with [`from_logits`][jsoftmax.SoftmaxJacobian.from_logits] or
    [`from_probs`][jsoftmax.SoftmaxJacobian.from_probs] (the same as the plain
    constructor `SoftmaxJacobian(p, axis)`).

    Vectors and shapes (`J` of probabilities `p`):

    * `J @ v` with `v.shape == p.shape` is the product with one vector per row
      (the JVP); with `v.shape == p.shape + (k,)` the trailing axis holds `k`
      vectors (columns) and the result has that shape too.
    * `v @ J` with `v.shape == p.shape` is the VJP (equal to `J @ v`: `J` is
      symmetric); with `v.shape == (k,) + p.shape` the leading axis holds `k` row
      vectors.

    Costs per row (`n` classes): products,
    [`diagonal`][jsoftmax.SoftmaxJacobian.diagonal],
    [`trace`][jsoftmax.SoftmaxJacobian.trace], `J[i, j]` and
    [`pinv_solve`][jsoftmax.SoftmaxJacobian.pinv_solve] $O(n)$;
    [`dense`][jsoftmax.SoftmaxJacobian.dense] $O(n^2)$;
    [`eigenvalues`][jsoftmax.SoftmaxJacobian.eigenvalues] $O(n^2 b)$ time with `b` the
    dtype's mantissa bits (dense `eigh` is $O(n^3)$).

    Attributes:
      p: the probabilities, as given.
      axis: the softmax axis, stored as a negative int (counted from the end, so
        `vmap` over leading batch axes keeps it right).
      scale: `None` (meaning 1) or an array of `p`'s rank with size 1 along
        `axis`.

    Note:
      * Masked classes (`p_i = 0`) have zero rows and columns; a fully masked row
        is the zero matrix.
      * [`trace`][jsoftmax.SoftmaxJacobian.trace] and
        [`pinv_solve`][jsoftmax.SoftmaxJacobian.pinv_solve] assume each row of `p` sums
        to 1 (a softmax output); [`eigenvalues`][jsoftmax.SoftmaxJacobian.eigenvalues]
        and the products do not.

    Examples:
      >>> import jax.numpy as jnp
      >>> from jsoftmax import SoftmaxJacobian
      >>> J = SoftmaxJacobian.from_probs(jnp.array([0.25, 0.75]))
      >>> print(J @ jnp.array([1.0, 0.0]))
      [ 0.1875 -0.1875]
      >>> print(J.dense())
      [[ 0.1875 -0.1875]
       [-0.1875  0.1875]]
      >>> print(J.trace(), J[0, 1])
      0.375 -0.1875
    """

    __array_ufunc__ = None  # make ``numpy_array @ J`` defer to ``J.__rmatmul__``

    def __init__(self, p: ArrayLike, axis: int = -1, *, scale: ArrayLike | None = None):
        p = _checks.as_float_array(p, "p")
        ax = _checks.canonical_axis(axis, p.ndim) - p.ndim
        if scale is not None:
            scale = _checks.per_row_array(scale, p.shape, (ax % p.ndim,), "scale")
        self.p = p
        self.axis = ax
        self.scale = scale

    # -- pytree ------------------------------------------------------------------------

    def tree_flatten(self):
        return (self.p, self.scale), (self.axis,)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.p, obj.scale = children
        (obj.axis,) = aux
        return obj

    # -- constructors ------------------------------------------------------------------

    @classmethod
    def from_probs(
        cls, p: ArrayLike, axis: int = -1, *, scale: ArrayLike | None = None
    ) -> SoftmaxJacobian:
        """The operator of probabilities `p` (a softmax output) along `axis`.

        `scale` (optional, broadcastable to the batch shape) multiplies the matrix.
        """
        return cls(p, axis, scale=scale)

    @classmethod
    def from_logits(
        cls,
        x: ArrayLike,
        axis: int = -1,
        where: ArrayLike | None = None,
        *,
        scale: ArrayLike | None = None,
    ) -> SoftmaxJacobian:
        """The Jacobian of [`jsoftmax.softmax`][] at logits `x` (cost $O(n)$).

        `p` is computed with `rule="jvp"`, so the operator can be differentiated
        with respect to `x` in both modes. `where` masks classes as in
        [`jsoftmax.softmax`][].
        """
        x = _checks.as_float_array(x)
        ax = _checks.canonical_axis(axis, x.ndim)
        return cls(softmax(x, ax, where=where, rule="jvp"), ax, scale=scale)

    # -- shape information -------------------------------------------------------------

    @property
    def n(self) -> int:
        """The number of classes (the length of the softmax axis)."""
        return self.p.shape[self.axis]

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """`p.shape` without the softmax axis."""
        ax = self.axis % self.p.ndim
        return tuple(s for k, s in enumerate(self.p.shape) if k != ax)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of [`dense`][jsoftmax.SoftmaxJacobian.dense]: `batch_shape + (n, n)`."""
        return (*self.batch_shape, self.n, self.n)

    @property
    def dtype(self):
        """The dtype of `p`."""
        return self.p.dtype

    @property
    def T(self) -> SoftmaxJacobian:
        """The transpose: `J` itself (it is symmetric)."""
        return self

    def __repr__(self) -> str:
        s = "" if self.scale is None else ", scaled"
        return f"SoftmaxJacobian(shape={self.shape}, axis={self.axis}, dtype={self.dtype}{s})"

    # -- helpers -----------------------------------------------------------------------

    def _scale_like(self, a: jax.Array, lead: int = 0, trail: int = 0) -> jax.Array:
        """`a * scale` with `scale` padded by `lead`/`trail` size-1 axes."""
        if self.scale is None:
            return a
        s = self.scale.reshape((1,) * lead + self.scale.shape + (1,) * trail)
        return a * s.astype(a.dtype)

    def _product(self, v: ArrayLike, side: str) -> jax.Array:
        v = _checks.as_float_array(v, "v")
        p = self.p
        if v.shape == p.shape:
            lead = trail = 0
        elif side == "right" and v.shape[:-1] == p.shape:
            lead, trail = 0, 1
        elif side == "left" and v.shape[1:] == p.shape:
            lead, trail = 1, 0
        else:
            extra = "p.shape + (k,)" if side == "right" else "(k,) + p.shape"
            expr = "J @ v" if side == "right" else "v @ J"
            raise ValueError(
                f"{expr}: v has shape {v.shape}, but this SoftmaxJacobian acts on vectors of "
                f"shape p.shape = {p.shape} (or {extra} for k vectors)."
            )
        cdt = _compute_dtype(p.dtype, v.dtype)
        pc = p.astype(cdt).reshape((1,) * lead + p.shape + (1,) * trail)
        # The softmax axis is negative, so leading axes leave it unchanged.
        axes = (self.axis - trail,)
        out = _formulas.jac_product(pc, v.astype(cdt), axes)
        out = self._scale_like(out, lead, trail)
        return out.astype(jnp.result_type(p.dtype, v.dtype))

    def _last(self) -> jax.Array:
        """`p` in the compute dtype with the softmax axis last."""
        p = self.p.astype(_checks.accumulation_dtype(self.p.dtype))
        return jnp.moveaxis(p, self.axis, -1)

    def _batch_scale(self) -> jax.Array | None:
        if self.scale is None:
            return None
        return jnp.squeeze(self.scale, self.axis)

    # -- products ----------------------------------------------------------------------

    def __matmul__(self, v: ArrayLike) -> jax.Array:
        r"""`J @ v`: $s\,p\odot(v - \langle p, v\rangle)$, $O(n)$ per vector."""
        if isinstance(v, SoftmaxJacobian):
            return NotImplemented
        return self._product(v, "right")

    def __rmatmul__(self, v: ArrayLike) -> jax.Array:
        r"""`v @ J` (the VJP), $O(n)$ per vector; equal to `J @ v`."""
        return self._product(v, "left")

    def matvec(self, v: ArrayLike) -> jax.Array:
        """`J @ v` as a method (for use with solvers taking a callable)."""
        return self._product(v, "right")

    # -- structure ---------------------------------------------------------------------

    def dense(self) -> jax.Array:
        r"""The explicit matrices, shape `batch_shape + (n, n)`; $O(n^2)$ per row."""
        out = _formulas.dense_jacobian(self._last())
        s = self._batch_scale()
        if s is not None:
            out = out * s[..., None, None].astype(out.dtype)
        return out.astype(self.p.dtype)

    def diagonal(self) -> jax.Array:
        r"""The diagonal $s\,p_i(1 - p_i)$, laid out like `p`; $O(n)$."""
        d = _jacobian.jacobian_diagonal(self.p, self.axis)
        return self._scale_like(d)

    def trace(self) -> jax.Array:
        r"""The trace $s\sum_i p_i(1 - p_i) = s\,(1 - \sum_i p_i^2)$; $O(n)$.

        Returns an array of shape `batch_shape`.
        """
        cdt = _checks.accumulation_dtype(self.p.dtype)
        d = self._scale_like(_jacobian.jacobian_diagonal(self.p.astype(cdt), self.axis))
        return jnp.sum(d, axis=self.axis).astype(self.p.dtype)

    def __getitem__(self, key) -> jax.Array:
        r"""`J[i, j]` = $s\,p_i(\delta_{ij} - p_j)$ for every batch row, $O(1)$.

        `i` and `j` are ints or integer arrays broadcastable to `batch_shape`
        (negative counts from the end). Returns an array of shape `batch_shape`.
        """
        if not isinstance(key, tuple) or len(key) != 2:
            raise IndexError(
                "SoftmaxJacobian takes exactly two indices, J[i, j] (output i, input j); "
                f"got {key!r}. Use .dense() for slicing."
            )
        i, j = key
        for name, k in (("i", i), ("j", j)):
            if isinstance(k, slice) or k is None or k is Ellipsis:
                raise IndexError(
                    f"SoftmaxJacobian index {name} must be an integer, got {k!r}; "
                    "use .dense() for slicing."
                )
        out = _jacobian.partial_derivative(self.p, i, j, self.axis)
        s = self._batch_scale()
        return out if s is None else out * s.astype(out.dtype)

    # -- spectrum and solves -----------------------------------------------------------

    def eigenvalues(self) -> jax.Array:
        r"""Eigenvalues of each matrix in ascending order, without a dense `eigh`.

        $\mathrm{diag}(p) - pp^\top$ is a rank-one downdate of a diagonal
        matrix. With $\det(D - \lambda I - pp^\top) = \prod_i (p_i - \lambda)
        \bigl(1 - \sum_i \frac{p_i^2}{p_i - \lambda}\bigr)$, its eigenvalues are the
        roots of the secular equation

        $$
        g(\lambda) = \sum_i \frac{p_i^2}{p_i - \lambda} - 1 = 0,
        $$

        which interlace the sorted $d_1 \le \dots \le d_n$ of `p`:
        $\lambda_1 \in [d_1 - \|p\|^2, d_1]$ and
        $\lambda_k \in [d_{k-1}, d_k]$. $g$ increases from $-\infty$
        to $+\infty$ on each open interval, so bisection finds each root; an
        interval of zero width (a repeated $p_i$) is itself the eigenvalue, and
        a zero $p_i$ (weight 0 in $g$) gives the eigenvalue 0. When
        $\sum p = 1$, $g(0) = 0$: the smallest eigenvalue is 0 (the
        eigenvector is $1$). Each evaluation of $g$ is shifted to the
        interval's pole for accuracy.

        Cost: $O(n^2 b)$ time and $O(n^2)$ memory per row (all `n`
        roots bisected together, `b` ≈ mantissa bits + 8 iterations), against
        $O(n^3)$ for `jnp.linalg.eigh(J.dense())`. Absolute accuracy is a few
        machine epsilons of $\max_i p_i$.

        Returns:
          Array of shape `batch_shape + (n,)`, ascending (multiplied by `scale`).

        Note:
          Not differentiable: the result carries no gradient (it is wrapped in
          `jax.lax.stop_gradient`). A row containing NaN gives NaN eigenvalues.

        Examples:
          >>> import jax.numpy as jnp
          >>> from jsoftmax import SoftmaxJacobian
          >>> ev = SoftmaxJacobian.from_probs(jnp.array([0.2, 0.3, 0.5])).eigenvalues()
          >>> with jnp.printoptions(precision=4, suppress=True):
          ...     print(ev)
          [0.     0.2319 0.3881]
        """
        d = jnp.sort(lax.stop_gradient(self._last()), axis=-1)  # batch + (n,)
        n = d.shape[-1]
        if n == 0:
            return jnp.zeros((*self.batch_shape, 0), self.p.dtype)
        w = d * d
        norm2 = jnp.sum(w, axis=-1, keepdims=True)
        # Interval k: [lo_k, hi_k] with pole origin o_k; lambda = o_k + tau.
        lo = jnp.concatenate([d[..., :1] - norm2, d[..., :-1]], axis=-1)
        hi = d
        origin = jnp.concatenate([d[..., :1], d[..., :-1]], axis=-1)
        # delta[..., k, i] = d_i - o_k (exact for close values), weights w_i.
        delta = d[..., None, :] - origin[..., :, None]
        t_lo, t_hi = lo - origin, hi - origin
        one = jnp.ones((), d.dtype)

        def g(tau):
            terms = w[..., None, :] / (delta - tau[..., None])
            return jnp.sum(terms, axis=-1) - one

        def body(_, bounds):
            a, b = bounds
            mid = (a + b) / 2
            up = g(mid) > 0  # g increases: the root lies left of mid
            return jnp.where(up, a, mid), jnp.where(up, mid, b)

        iters = jnp.finfo(d.dtype).nmant + 8
        a, b = lax.fori_loop(0, iters, body, (t_lo, t_hi))
        ev = origin + (a + b) / 2
        # Propagate NaN (comparisons with NaN would silently pick a side).
        bad = jnp.any(jnp.isnan(d), axis=-1, keepdims=True)
        ev = jnp.where(bad, jnp.nan, ev)
        s = self._batch_scale()
        if s is not None:
            ev = jnp.sort(ev * lax.stop_gradient(s)[..., None].astype(ev.dtype), axis=-1)
        return ev.astype(self.p.dtype)

    def pinv_solve(self, b: ArrayLike) -> jax.Array:
        r"""Minimum-norm least-squares solution $x = J^+ b$, in $O(n)$.

        `J` is singular: its null space holds $1$ and every $e_i$ with
        $p_i = 0$. Let $S = \{i : p_i > 0\}$ (size $m$). For a
        probability vector ($\sum_S p_i = 1$) the range of `J` is
        $\{v : v_i = 0 \ (i \notin S),\ \sum_S v_i = 0\}$ and
        $J(b/p + c1) = b$ for any such $b$ and any $c$. So

        $$
        \tilde b_i = b_i - \tfrac{1}{m}\textstyle\sum_{k\in S} b_k,\qquad
        x_i = \frac{1}{s}\Bigl(\frac{\tilde b_i}{p_i}
        - \frac{1}{m}\sum_{k\in S}\frac{\tilde b_k}{p_k}\Bigr)
        \ (i \in S), \qquad x_i = 0 \ (i \notin S):
        $$

        project $b$ onto the range, divide by $p$, then project the
        solution orthogonally to the null space. Equal to
        `jnp.linalg.pinv(J.dense()) @ b` (which costs $O(n^3)$).

        Args:
          b: right-hand side, shape `p.shape` or `p.shape + (k,)` (`k`
            right-hand sides in the trailing axis).

        Returns:
          `x` with the shape of `b`.

        Note:
          Assumes each row of `p` sums to 1 (over its non-zero entries). The
          solution grows like $1/\min_S p_i$: tiny probabilities make the
          problem ill-conditioned, exactly as for the dense pseudo-inverse (which
          would instead cut singular values below its `rtol`). A fully masked row
          (`p = 0`) gives `x = 0`; a `scale` of 0 gives inf/NaN.

        Examples:
          >>> import jax.numpy as jnp
          >>> from jsoftmax import SoftmaxJacobian
          >>> J = SoftmaxJacobian.from_probs(jnp.array([0.25, 0.75]))
          >>> x = J.pinv_solve(jnp.array([1.0, -1.0]))
          >>> with jnp.printoptions(precision=4):
          ...     print(x, J @ x)
          [ 2.6667 -2.6667] [ 1. -1.]
        """
        b = _checks.as_float_array(b, "b")
        p = self.p
        if b.shape == p.shape:
            trail = 0
        elif b.shape[:-1] == p.shape:
            trail = 1
        else:
            raise ValueError(
                f"pinv_solve: b has shape {b.shape}, but this SoftmaxJacobian acts on vectors "
                f"of shape p.shape = {p.shape} (or p.shape + (k,) for k right-hand sides)."
            )
        cdt = _compute_dtype(p.dtype, b.dtype)
        pc = p.astype(cdt).reshape(p.shape + (1,) * trail)
        bc = b.astype(cdt)
        axes = (self.axis - trail,)
        zero = jnp.zeros((), cdt)
        support = pc > 0
        m = jnp.maximum(jnp.sum(support, axis=axes, keepdims=True), 1).astype(cdt)

        def center(a):  # remove the mean over the support, zero outside it
            a = jnp.where(support, a, zero)
            return jnp.where(support, a - jnp.sum(a, axis=axes, keepdims=True) / m, zero)

        b_range = center(bc)
        safe_p = jnp.where(support, pc, jnp.ones((), cdt))
        x = center(b_range / safe_p)
        if self.scale is not None:
            x = x / self.scale.reshape(self.scale.shape + (1,) * trail).astype(cdt)
        return x.astype(jnp.result_type(p.dtype, b.dtype))
