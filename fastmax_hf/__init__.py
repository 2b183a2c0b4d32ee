"""fastmax_hf: Fastmax attention (a normalised 2nd-order Taylor kernel of exp) in linear
time, as a Hugging Face Transformers attention implementation.

    import fastmax_hf
    o = fastmax_hf.fastmax(q, k, v, causal=True)
"""

from .chunked import feature_count
from .functional import fastmax
from .reference import fastmax_reference
from .seed_api import FASTMultiHeadAttention, fastmax_function, rpe_matrix_creator

__version__ = "0.1.0"

__all__ = [
    "fastmax",
    "fastmax_reference",
    "feature_count",
    "FASTMultiHeadAttention",
    "fastmax_function",
    "rpe_matrix_creator",
]
