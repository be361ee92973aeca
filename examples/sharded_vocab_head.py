"""Train a language-model output head with its vocabulary split over 8 devices.

The head maps hidden states ``h`` (batch x d) to logits over a vocabulary of ``V``
tokens with a weight matrix ``W`` (d x V). Here ``W`` is sharded by vocabulary over a
mesh axis ``"vocab"`` of 8 devices, the batch over nothing, and the loss is
:func:`jsoftmax.sharded.cross_entropy` inside :func:`jax.shard_map`: each device
computes only its ``V / 8`` logits, and only three scalars per example cross devices.
The same model is trained unsharded with :func:`jsoftmax.cross_entropy` on one device;
the losses of the two runs are printed side by side and must match at every step.

On a machine without accelerators the 8 devices are simulated CPU devices (the flag
below must be set before JAX starts). Run::

    python examples/sharded_vocab_head.py
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import jsoftmax  # noqa: E402
from jsoftmax import sharded  # noqa: E402

jax.config.update("jax_enable_x64", True)  # float64, so the two runs agree to ~1e-12

DEVICES, BATCH, D, VOCAB, VOCAB_REAL, STEPS, LR = 8, 64, 32, 1000, 997, 20, 0.5
# VOCAB_REAL = 997 is not a multiple of 8: the weight matrix is padded to 1000 columns
# and the padded classes are masked with num_classes=VOCAB_REAL.


def make_data(seed=0):
    """Hidden states and next-token labels drawn from a random 'teacher' head."""
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(BATCH, D))
    teacher = rng.normal(size=(D, VOCAB_REAL)) * 0.5
    logits = h @ teacher
    g = rng.gumbel(size=logits.shape)
    labels = np.argmax(logits + g, axis=-1)
    return h, labels


def unsharded_loss(w, h, labels):
    return jnp.mean(jsoftmax.cross_entropy(h @ w, labels))


def main() -> int:
    if jax.device_count() < DEVICES:
        raise SystemExit(f"needs {DEVICES} devices, found {jax.device_count()}")
    mesh = jax.make_mesh((DEVICES,), ("vocab",))
    h, labels = make_data()
    w0 = np.zeros((D, VOCAB_REAL))

    # --- sharded: W split by vocabulary; h and labels replicated -------------------
    def head_loss(w_shard, h, labels):
        logits_shard = h @ w_shard  # (batch, VOCAB / 8): this device's classes only
        loss = sharded.cross_entropy(logits_shard, labels, "vocab", num_classes=VOCAB_REAL)
        return jnp.mean(loss)

    sharded_loss = jax.shard_map(
        head_loss, mesh=mesh, in_specs=(P(None, "vocab"), P(), P()), out_specs=P()
    )

    @jax.jit
    def sharded_step(w, h, labels):
        loss, grad = jax.value_and_grad(sharded_loss)(w, h, labels)
        return w - LR * grad, loss

    @jax.jit
    def unsharded_step(w, h, labels):
        loss, grad = jax.value_and_grad(unsharded_loss)(w, h, labels)
        return w - LR * grad, loss

    w_pad = np.pad(w0, ((0, 0), (0, VOCAB - VOCAB_REAL)))
    with jax.set_mesh(mesh):
        w_s = jax.device_put(w_pad, NamedSharding(mesh, P(None, "vocab")))
        h_s = jax.device_put(h, NamedSharding(mesh, P()))
        y_s = jax.device_put(labels, NamedSharding(mesh, P()))
        per_device = w_s.addressable_shards[0].data.shape
        print(f"W: {w_pad.shape} over {DEVICES} devices, {per_device} per device")
        print(f"{'step':>4} {'sharded loss':>16} {'unsharded loss':>16} {'|diff|':>10}")
        w_u = jnp.asarray(w0)
        for step in range(STEPS):
            w_s, loss_s = sharded_step(w_s, h_s, y_s)
            w_u, loss_u = unsharded_step(w_u, h, labels)
            loss_s, loss_u = float(loss_s), float(loss_u)
            diff = abs(loss_s - loss_u)
            print(f"{step:>4} {loss_s:>16.12f} {loss_u:>16.12f} {diff:>10.2e}")
            assert diff <= 1e-12 * max(1.0, abs(loss_u)), (step, loss_s, loss_u)
        assert w_s.sharding.is_equivalent_to(NamedSharding(mesh, P(None, "vocab")), 2)
        w_final = np.asarray(jax.device_get(w_s))
    np.testing.assert_allclose(w_final[:, :VOCAB_REAL], np.asarray(w_u), rtol=1e-10, atol=1e-12)
    assert np.all(w_final[:, VOCAB_REAL:] == 0.0)  # padded classes never get a gradient
    print("sharded and unsharded losses match at every step; final weights match")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
