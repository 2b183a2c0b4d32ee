"""Loading a causal LM and its tokenizer from a GGUF file (``--gguf_file``), for the scripts.

A GGUF file (llama.cpp's format) holds quantized weights, the model's config and its tokenizer.
transformers reads it with ``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf``
package (``pip install gguf``; on a machine without a package index, the wheel that
``tools/smollm2_carry.py`` carries and installs), and dequantizes every weight to ``dtype``: the
model it returns is a plain float transformers model (SmolLM2-135M-Instruct.Q4_1.gguf: a
``LlamaForCausalLM``), the teacher and the starting point of a conversion.

    from gguf_model import load_gguf_model     # scripts/ on sys.path, as the scripts put it
    model, tokenizer = load_gguf_model("/tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

Like script_common.py, this module is imported by name by scripts run as files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

GGUF_SUFFIX = ".gguf"


def check_gguf_file(gguf_file: str | Path, argument: str = "--gguf_file") -> Path:
    """The path of an existing ``.gguf`` file; otherwise a ValueError naming ``argument``."""
    path = Path(gguf_file)
    if not path.is_file():
        raise ValueError(f"{argument} {str(gguf_file)!r}: no such file")
    if path.suffix.lower() != GGUF_SUFFIX:
        raise ValueError(f"{argument} {str(gguf_file)!r}: not a {GGUF_SUFFIX} file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{argument} {str(gguf_file)!r}: does not start with the GGUF magic bytes (got {magic!r})")
    return path


def check_gguf_package(argument: str = "--gguf_file"):
    """transformers needs the ``gguf`` package to read GGUF files: an ImportError saying how to get it."""
    if importlib.util.find_spec("gguf") is None:
        raise ImportError(
            f"{argument} needs the `gguf` package: pip install gguf, or on the GPU machine the wheel that "
            "`python tools/smollm2_carry.py assemble` installs (put the PYTHONPATH it prints in front of the command)"
        )


def load_gguf_model(gguf_file: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    argument: str = "--gguf_file"):
    """(model, tokenizer) from a GGUF file: the weights dequantized to ``dtype``, attention
    ``attn_implementation`` ("sdpa" for the teacher; "fastmax" once fastmax_hf is imported).

    The model is in eval mode. Errors (ValueError, ImportError) name ``argument``: a missing or
    non-GGUF file, no ``gguf`` package, a tokenizer without an eos token (which packing needs).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = check_gguf_file(gguf_file, argument)
    check_gguf_package(argument)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{argument} {str(gguf_file)!r}: its tokenizer has no eos token, which packing needs")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    return model.eval(), tokenizer
