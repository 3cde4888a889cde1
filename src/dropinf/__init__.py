"""dropinf: influence functions on compressed per-example gradients.

Sign convention (everywhere): I(z_k) = -v^T (H + lambda I)^{-1} g_k, with v the mean test
gradient and H = G^T G / n. Positive = up-weighting z_k raises test loss (harmful);
negative = helpful.
"""
__version__ = "0.1.0"

SIGN_CONVENTION = (
    "I(z_k) = -v^T (H + lambda I)^{-1} g_k; v = mean test gradient; H = G^T G / n; "
    "positive = up-weighting the training example raises test loss (harmful), negative = helpful"
)

from .compressors import COMPRESSORS, Compressor, compressor  # noqa: E402
from .errors import DropinfError  # noqa: E402
from .extraction import extract  # noqa: E402
from .influence import influence  # noqa: E402  (binds the function over the same-named submodule)
from .influence import pairwise_blocks, self_influence  # noqa: E402
from .pipeline.query import query  # noqa: E402

__all__ = ["compressor", "extract", "influence", "self_influence", "pairwise_blocks", "query", "Compressor",
           "COMPRESSORS", "DropinfError", "SIGN_CONVENTION", "__version__"]
