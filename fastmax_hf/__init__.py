"""fastmax_hf: Fastmax attention (a normalised 2nd-order Taylor kernel of exp) in linear
time, as a Hugging Face Transformers attention implementation.

    import fastmax_hf
    o = fastmax_hf.fastmax(q, k, v, causal=True)

Importing the package also registers attn_implementation="fastmax" with transformers
(see ``fastmax_hf.integration`` and docs/hf_integration.md).

Where things are decided, once each:
    options.py        FastmaxOptions: the kernel's coefficients and scale (default_scale,
                      can_vanish), resolved once by every public entry point and passed down
    backends.py       choose_backend: reference, chunked or triton, and the fallback warning
    stages.py         normalisation of q and k, the denominator check, dropout
    validation.py     argument checks
The implementations: reference.py (the definition), chunked.py (PyTorch), recurrent.py (the
state), kernels/ (Triton, imported as fastmax_hf.kernels; checkout_kernels.py finds it in a
source checkout that is not installed).
"""

from . import checkout_kernels

checkout_kernels.install()  # before anything imports fastmax_hf.kernels

from .chunked import feature_count  # noqa: E402
from .functional import fastmax  # noqa: E402
from .options import FastmaxOptions  # noqa: E402
from .reference import fastmax_reference  # noqa: E402
from .seed_api import FASTMultiHeadAttention, fastmax_function, rpe_matrix_creator  # noqa: E402
from .integration import (  # noqa: E402
    FastmaxCache,
    FastmaxConfig,
    FastmaxUnsupportedError,
    get_fastmax_config,
    set_fastmax_config,
)
from .integration import enable as _enable_hf_integration  # noqa: E402

_enable_hf_integration()

__version__ = "0.1.0"

__all__ = [
    "fastmax",
    "FastmaxOptions",
    "fastmax_reference",
    "feature_count",
    "FASTMultiHeadAttention",
    "fastmax_function",
    "rpe_matrix_creator",
    "FastmaxCache",
    "FastmaxConfig",
    "get_fastmax_config",
    "set_fastmax_config",
    "FastmaxUnsupportedError",
]
