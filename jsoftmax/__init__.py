"""jsoftmax: softmax and its derivatives as a verified, fast JAX primitive."""

from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from jsoftmax import sharded as sharded
from jsoftmax._attention import attention as attention
from jsoftmax._jacobian import hessian as hessian
from jsoftmax._jacobian import jacobian as jacobian
from jsoftmax._jacobian import jacobian_diagonal as jacobian_diagonal
from jsoftmax._jacobian import jacobian_from_probs as jacobian_from_probs
from jsoftmax._jacobian import log_softmax_jacobian as log_softmax_jacobian
from jsoftmax._jacobian import partial_derivative as partial_derivative
from jsoftmax._jacobian import softmax_hvp as softmax_hvp
from jsoftmax._jacobian import softmax_jvp as softmax_jvp
from jsoftmax._jacobian import softmax_vjp as softmax_vjp
from jsoftmax._linear import linear_cross_entropy as linear_cross_entropy
from jsoftmax._linear_post import linear_kl_divergence as linear_kl_divergence
from jsoftmax._linear_post import linear_token_log_probs as linear_token_log_probs
from jsoftmax._losses import cross_entropy as cross_entropy
from jsoftmax._losses import cross_entropy_hessian as cross_entropy_hessian
from jsoftmax._merge import merge_partials as merge_partials
from jsoftmax._operator import SoftmaxJacobian as SoftmaxJacobian
from jsoftmax._post import kl_divergence as kl_divergence
from jsoftmax._post import token_log_probs as token_log_probs
from jsoftmax._softmax import log_softmax as log_softmax
from jsoftmax._softmax import logsumexp as logsumexp
from jsoftmax._softmax import softmax as softmax

try:
    __version__ = _version("jsoftmax")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

# The tools import the core, never the reverse; only the verification entry point is
# re-exported here, once every core name above exists.
from jsoftmax import tools as tools  # noqa: E402
from jsoftmax.tools.verify import verify as verify  # noqa: E402

__all__ = [
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
]
