"""The string options of the public API are typed with ``Literal``: the annotation names
exactly the values the function accepts (pyright checks callers against it)."""

from __future__ import annotations

import typing

import jax.numpy as jnp
import pytest

import jsoftmax
from jsoftmax.tools import accuracy, bench, verify
from jsoftmax.tools.bench import _timing

from helpers import X64

X = jnp.array([[0.5, -1.0, 2.0], [1.0, 0.0, -0.5]], jnp.float32)
Y = jnp.array([2, 0])
W = jnp.ones((3, 4), jnp.float32)
Y4 = jnp.array([3, 1])

# (function, option, call with the option set, accepted values)
OPTIONS = [
    (jsoftmax.softmax, "rule", lambda v: jsoftmax.softmax(X, rule=v), {"vjp", "jvp"}),
    (
        jsoftmax.softmax,
        "precision",
        lambda v: jsoftmax.softmax(X, precision=v),
        {"default", "high"},
    ),
    (jsoftmax.log_softmax, "rule", lambda v: jsoftmax.log_softmax(X, rule=v), {"vjp", "jvp"}),
    (
        jsoftmax.log_softmax,
        "precision",
        lambda v: jsoftmax.log_softmax(X, precision=v),
        {"default", "high"},
    ),
    (jsoftmax.logsumexp, "rule", lambda v: jsoftmax.logsumexp(X, rule=v), {"vjp", "jvp"}),
    (
        jsoftmax.cross_entropy,
        "rule",
        lambda v: jsoftmax.cross_entropy(X, Y, rule=v),
        {"vjp", "jvp"},
    ),
    (
        jsoftmax.cross_entropy,
        "reduction",
        lambda v: jsoftmax.cross_entropy(X, Y, reduction=v),
        {"none", "sum", "mean"},
    ),
    (
        jsoftmax.linear_cross_entropy,
        "reduction",
        lambda v: jsoftmax.linear_cross_entropy(X, W, Y4, reduction=v),
        {"none", "sum", "mean"},
    ),
]


def _literal_values(fn, option: str) -> set[str]:
    """The values of the ``Literal`` in ``fn``'s annotation of ``option`` (also inside
    ``Sequence[...]`` or ``... | None``)."""
    hint = typing.get_type_hints(fn)[option]
    while typing.get_origin(hint) is not typing.Literal:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, (fn.__name__, option, hint)  # not a Literal option
        hint = args[0]
    return set(typing.get_args(hint))


@pytest.mark.parametrize(
    "fn, option, call, accepted", OPTIONS, ids=[f"{o[0].__name__}-{o[1]}" for o in OPTIONS]
)
def test_option_literal_is_what_the_function_accepts(fn, option, call, accepted):
    assert _literal_values(fn, option) == accepted
    for value in sorted(accepted):
        call(value)  # every value of the type is accepted
    with pytest.raises(ValueError, match=option):
        call("nonsense")


@pytest.mark.parametrize(
    "fn", [jsoftmax.sharded.cross_entropy, jsoftmax.sharded.linear_cross_entropy]
)
def test_sharded_reduction_is_the_same_literal(fn):
    assert _literal_values(fn, "reduction") == {"none", "sum", "mean"}


def test_verify_dtypes_literal_is_accepted():
    values = _literal_values(verify.verify, "dtypes")
    assert values == {"float16", "bfloat16", "float32", "float64"}
    for dtype in sorted(values):
        report = verify.verify(sizes=(3,), dtypes=(dtype,), batched=(), family=False)
        # verify() skips float64 where it is off (the CLI turns it on for its run).
        expected = {dtype} if dtype != "float64" or X64 else set()
        assert {r.dtype for r in report.rows} == expected


def test_accuracy_options_are_literals_of_their_tuples():
    assert _literal_values(accuracy.run, "dtypes") == set(accuracy.DTYPES)
    assert _literal_values(accuracy.run, "families") == set(accuracy.FAMILIES)
    assert _literal_values(accuracy.run, "ops") == set(accuracy.OPS)


def test_bench_group_literal_names_every_group_once():
    assert _literal_values(bench.run, "groups") == set(bench.GROUPS)
    assert sorted(typing.get_args(_timing.Group)) == sorted(bench.GROUPS)  # no duplicates
