"""fastmax_hf: Fastmax attention (a normalised 2nd-order Taylor kernel of exp) in linear
time, as a Hugging Face Transformers attention implementation.

    import fastmax_hf
    o = fastmax_hf.fastmax(q, k, v, causal=True)

Importing the package also registers attn_implementation="fastmax" with transformers
(see ``fastmax_hf.integration`` and docs/hf_integration.md).
"""

from .chunked import feature_count
from .functional import fastmax
from .reference import fastmax_reference
from .seed_api import FASTMultiHeadAttention, fastmax_function, rpe_matrix_creator
from .integration import (
    FastmaxCache,
    FastmaxConfig,
    get_fastmax_config,
    patch_gpt2,
    patch_llama,
    set_fastmax_config,
    unpatch_gpt2,
    unpatch_llama,
)
from .integration import enable as _enable_hf_integration

_enable_hf_integration()

__version__ = "0.1.0"

__all__ = [
    "fastmax",
    "fastmax_reference",
    "feature_count",
    "FASTMultiHeadAttention",
    "fastmax_function",
    "rpe_matrix_creator",
    "FastmaxCache",
    "FastmaxConfig",
    "get_fastmax_config",
    "set_fastmax_config",
    "patch_llama",
    "unpatch_llama",
    "patch_gpt2",
    "unpatch_gpt2",
]
