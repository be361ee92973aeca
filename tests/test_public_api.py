"""Pins the public surface: an accidental export or removal fails here."""

import jsoftmax

EXPECTED = {
    "SoftmaxJacobian",
    "attention",
    "cross_entropy",
    "cross_entropy_hessian",
    "hessian",
    "jacobian",
    "jacobian_diagonal",
    "jacobian_from_probs",
    "kl_divergence",
    "linear_cross_entropy",
    "linear_kl_divergence",
    "linear_token_log_probs",
    "log_softmax",
    "log_softmax_jacobian",
    "logsumexp",
    "merge_partials",
    "partial_derivative",
    "sharded",
    "softmax",
    "softmax_hvp",
    "softmax_jvp",
    "softmax_vjp",
    "token_log_probs",
    "tools",
    "verify",
}


def test_all_is_exactly_the_public_api():
    assert set(jsoftmax.__all__) == EXPECTED
    assert sorted(jsoftmax.__all__) == list(jsoftmax.__all__)


def test_every_public_name_resolves_and_is_documented():
    for name in jsoftmax.__all__:
        obj = getattr(jsoftmax, name)
        assert obj.__doc__ and len(obj.__doc__) > 40, name


def test_sharded_submodule_surface():
    assert set(jsoftmax.sharded.__all__) == {
        "attention",
        "cross_entropy",
        "linear_cross_entropy",
        "linear_token_log_probs",
        "log_softmax",
        "softmax",
    }


def test_tools_subpackage_surface():
    assert set(jsoftmax.tools.__all__) == {"accuracy", "bench", "verify"}


def test_no_stray_public_attributes():
    public = {n for n in dir(jsoftmax) if not n.startswith("_")}
    assert public == set(jsoftmax.__all__)


def test_version_comes_from_metadata():
    from importlib.metadata import version

    assert jsoftmax.__version__ == version("jsoftmax")
