"""What the two user scripts, scripts/finetune.py and scripts/eval_long_context.py, share.

Stopping on bad input with a message, the tokenizer, a pretrained model's config and its
position limit, and matplotlib without a display. Both scripts are run as files (python,
accelerate launch), not as a package, so each puts its own folder on sys.path and imports
this module by name.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fastmax_hf import data


def fail(message: str):
    """Stop with a message instead of a traceback.

    The prefix is what argparse puts before its own errors, the name of the script being run,
    so that bad arguments read the same whether argparse or the script refused them.
    """
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


def load_tokenizer(args, accelerator, builtin: bool):
    """--tokenizer, else the model's own, else (``builtin``: a built-in config, which has none)
    the default BPE.

    The main process goes first so that a default tokenizer is trained and cached once.
    """
    name = args.tokenizer or (data.DEFAULT if builtin else args.model)
    with accelerator.main_process_first():
        try:
            return data.load_tokenizer(name, args.cache_dir, args.vocab_size)
        except ValueError as err:
            fail(str(err))


def load_pretrained_config(model: str, builtin_names):
    """The config of --model, a hub id or a local model directory (``builtin_names``: the built-in
    configs the script would also have accepted, for the message)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:
        fail(f"--model {model!r} is not a built-in config {sorted(builtin_names)}, a local model "
             f"directory, nor a hub id that can be loaded ({type(err).__name__}: {err})")


def max_positions(config) -> int | None:
    """How many positions the model can encode, under the names model families give it (None: no limit)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def check_vocabulary(config, tokenizer_size: int):
    """A token id past the embedding would fail deep inside the first forward pass."""
    if tokenizer_size > config.vocab_size:
        fail(f"the tokenizer has {tokenizer_size} tokens but the model's embedding only {config.vocab_size}: "
             "pass the model's own --tokenizer")


def pyplot():
    """matplotlib.pyplot on the Agg backend, which only writes files: the scripts run on machines
    without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
