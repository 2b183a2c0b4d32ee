"""What the two user scripts, scripts/finetune.py and scripts/eval_long_context.py, share.

Stopping on bad input with a message, the tokenizer, a pretrained model's config and its
position limit, matplotlib without a display, and checkpoint folders written atomically and
checked before a resume. Both scripts are run as files (python,
accelerate launch), not as a package, so each puts its own folder on sys.path and imports
this module by name.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import zipfile
from pathlib import Path

from fastmax_hf import data


def fail(message: str):
    """Stop with a message instead of a traceback.

    The prefix is what argparse puts before its own errors, the name of the script being run,
    so that bad arguments read the same whether argparse or the script refused them.
    """
    raise SystemExit(f"{Path(sys.argv[0]).name}: error: {message}")


def load_tokenizer(args, accelerator, builtin: bool):
    """--tokenizer, else the model's own (--gguf_file: the one it embeds), else (``builtin``: a
    built-in config, which has none) the default BPE.

    The main process goes first so that a default tokenizer is trained and cached once.
    """
    if getattr(args, "gguf_file", None) is not None and args.tokenizer is None:
        import gguf_model  # scripts/ is on sys.path, as the scripts put it

        try:
            return gguf_model.load_gguf_tokenizer(args.gguf_file)
        except (ValueError, ImportError) as err:
            fail(str(err))
    name = args.tokenizer or (data.DEFAULT if builtin else args.model)
    with accelerator.main_process_first():
        try:
            return data.load_tokenizer(name, args.cache_dir, args.vocab_size)
        except ValueError as err:
            fail(str(err))


def load_pretrained_config(model: str, builtin_names, argument: str = "--model"):
    """The config of ``argument`` (--model), a hub id or a local model directory (``builtin_names``:
    the built-in configs the script would also have accepted, for the message)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model)
    except Exception as err:
        fail(f"{argument} {model!r} is not a built-in config {sorted(builtin_names)}, a local model "
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


# --------------------------------------------------------------------------- checkpoints on disk

# A checkpoint is written into a folder of this prefix beside its final name and renamed into
# place once complete, so that a kill at any instant leaves only complete checkpoints under
# their names (and, at worst, an incomplete folder that nothing reads and the next save removes).
INCOMPLETE_PREFIX = "incomplete-"
REPLACED_PREFIX = "replaced-"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format (optimizer, scheduler, RNG states)


def _fsync(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str):
    """Write a text file and flush it to disk before returning."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def incomplete_dir(final: Path) -> Path:
    """Where the checkpoint that will be ``final`` is written until it is complete."""
    return final.parent / f"{INCOMPLETE_PREFIX}{final.name}"


def publish_directory(tmp: Path, final: Path):
    """Rename the complete folder ``tmp`` to ``final`` (one rename: a reader sees all or nothing).

    Its files are flushed to disk first; a ``final`` already there (a run started again over the
    same output folder) is replaced."""
    for file in tmp.rglob("*"):
        if file.is_file():
            _fsync(file)
    old = final.parent / f"{REPLACED_PREFIX}{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(final.parent)


def _safetensors_problem(path: Path) -> str | None:
    """Why a .safetensors file is unreadable (truncated, bad header), or None: its 8-byte header
    length, its JSON header and the data offsets it lists must account for the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than the 8-byte header length"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"truncated: {size} bytes, but its header alone takes {8 + n}"
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            return f"its header is not valid JSON ({err})"
    try:
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, AttributeError):
        return "its header does not list data offsets"
    if 8 + n + end != size:
        return f"truncated: {size} bytes, but its header describes {8 + n + end}"
    return None


def _zip_problem(path: Path) -> str | None:
    """Why a file written by torch.save (a zip archive) is unreadable, or None. Files of other
    formats are not checked."""
    with open(path, "rb") as f:
        if f.read(4) != _ZIP_MAGIC:
            return None
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        return f"truncated or damaged archive ({err})"
    return None


TRAINER_STATE = "trainer_state.json"
TRAINER_STATE_KEYS = ("step", "stage", "history", "elapsed_s", "run")


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder ``path`` cannot be resumed from, naming the damaged file (a
    truncated trainer_state.json, a truncated .safetensors or torch.save file), or None."""
    path = Path(path)
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        return f"not a checkpoint directory (no {TRAINER_STATE})"
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        return f"{state_file} is damaged: not valid JSON ({err})"
    if not isinstance(state, dict) or any(key not in state for key in TRAINER_STATE_KEYS):
        return f"{state_file} is damaged: it lacks some of {list(TRAINER_STATE_KEYS)}"
    for file in sorted(path.rglob("*")):
        if not file.is_file():
            continue
        problem = _safetensors_problem(file) if file.suffix == ".safetensors" else _zip_problem(file)
        if problem is not None:
            return f"{file} is damaged: {problem}"
    return None
