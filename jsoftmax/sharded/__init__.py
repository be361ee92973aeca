r"""Softmax, log-softmax and cross-entropy with the softmax axis split over devices, and
attention with the sequence split over devices.

Use these functions **inside** `jax.shard_map` when the class (softmax) axis of the
logits is sharded over one or more mesh axes, as in a large-vocabulary language model
whose output layer is split by vocabulary ("vocab-parallel"). Each device holds a
contiguous block of classes; the functions communicate only per-row scalars with JAX's
own collectives (`lax.pmax`, `lax.psum`), never the logits:

* `softmax`: forward all-reduces the row max and the sum of exponentials; backward
  all-reduces $\langle g, p\rangle$.
* `log_softmax`: forward as `softmax`; backward all-reduces $\sum_i g_i$.
* `cross_entropy`: forward all-reduces the row max, then the sum of exponentials with
  the label's logit (or $\sum q$ and $\sum q(s - M)$ for probability labels) and the
  options' per-row sums; backward none (the cotangent $(\sum q)p - q$ is local).
* `linear_cross_entropy`: forward as `cross_entropy` with integer labels; backward
  all-reduces `dx` (`N * H` values).
* `linear_token_log_probs`: forward all-reduces the row max, then the sums with the
  label's logit (and the entropy's sum); backward as `linear_cross_entropy`.

`attention` (ring attention, context parallelism) splits the sequence instead: each
device holds a contiguous block of the queries, keys and values, and the key/value
blocks travel around the ring of devices with `lax.ppermute` (`P - 1` sends forward;
backward the same, plus `P` sends of the `dK`/`dV` accumulators), each step merged with
the same log-sum-exp rule; nothing is all-reduced or gathered but the sinks' gradient.

Every forward all-reduce carries one scalar per row (per statistic). The forward pass
is the merge rule of [`merge_partials`][jsoftmax.merge_partials] applied across
devices: each device computes its block's row max and sum of exponentials in one local
pass, then the maxima are all-reduced and the sums, rescaled to the global max, are
all-reduced (with any other per-row sum riding in the same all-reduce). `softmax` and
`log_softmax` are `jax.custom_vjp` rules that save one logits-sized array (the local
block of probabilities, or of log-probabilities) for the backward pass; their backward
rules are the single-device formulas with every sum over the softmax axis replaced by
a local sum followed by an all-reduce. The losses use the per-row kernel of the
single-device losses (the same options as [`cross_entropy`][jsoftmax.cross_entropy])
on the merged statistics; `cross_entropy` saves its block of logits,
`linear_cross_entropy` its inputs, plus a few numbers per row.

Outside `jax.shard_map`, [`jsoftmax.softmax`][jsoftmax.softmax] and friends already work
on arrays placed with a `NamedSharding` under `jax.jit`: XLA inserts the same two
all-reduces. This module is for code that is written per shard.

**Class count not divisible by the number of shards.** `jax.shard_map` needs the class
axis to split evenly, so pad it at the end (any values, e.g. with `jnp.pad`) to a
multiple of the shard count and pass the true count as `num_classes`: padded entries
are then masked (probability 0, gradient 0, never a target). Without padding,
`jax.shard_map` raises before anything is computed.
"""

from jsoftmax.sharded._attention import attention as attention
from jsoftmax.sharded._linear import linear_cross_entropy as linear_cross_entropy
from jsoftmax.sharded._losses import cross_entropy as cross_entropy
from jsoftmax.sharded._post import linear_token_log_probs as linear_token_log_probs
from jsoftmax.sharded._softmax import log_softmax as log_softmax
from jsoftmax.sharded._softmax import softmax as softmax

__all__ = [
    "attention",
    "cross_entropy",
    "linear_cross_entropy",
    "linear_token_log_probs",
    "log_softmax",
    "softmax",
]
