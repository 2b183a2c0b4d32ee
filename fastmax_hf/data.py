"""Data for training and evaluating fastmax models, with defaults that need no download.

* The default corpus: the Python standard library's own ``.py`` sources (every Python
  installation has them), read in sorted order, split into train / validation by file.
* The default tokenizer: a byte-level BPE trained on that corpus with ``tokenizers``,
  cached on disk, wrapped as a ``PreTrainedTokenizerFast``.
* "docstrings": the docstrings of installed packages (transformers, torch, numpy,
  accelerate), English prose beside the code; "default+docstrings" joins the two.
* Any other text: a ``datasets`` hub name or local text / json / jsonl / parquet / csv
  files (``datasets`` is imported only then, so the default path runs without it).
* Packing: documents joined by the end-of-text token and cut into fixed-length blocks.
* Built-in model configs: small Llama-shaped models with grouped-query attention.

    splits = load_text_dataset("default")
    tokenizer = load_tokenizer("default")
    blocks = token_blocks(splits, tokenizer, block_size=256)   # {"train": (N, 256), "validation": (M, 256)}
    config = builtin_model_config("llama-small", vocab_size=len(tokenizer))
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT = "default"
# The held-out evaluation texts of a conversion, by name (see held_out_corpus): every split is
# "validation"; nothing in them is ever trained on.
PYDOC_TOPICS = "pydoc-topics"
HELD_OUT_STDLIB = "heldout-stdlib"
HELD_OUT_CORPORA = (PYDOC_TOPICS, HELD_OUT_STDLIB)
END_OF_TEXT = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 8192
DEFAULT_VALIDATION_PERCENT = 5

# Suffix of a local data file -> the `datasets` builder that reads it.
LOCAL_BUILDERS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}


@dataclass
class TextSplits:
    """Documents of one corpus, split for training and validation."""

    name: str
    train: list[str]
    validation: list[str]

    def fingerprint(self) -> str:
        """A short hash of every document, to key on-disk caches."""
        digest = hashlib.sha256(self.name.encode())
        for split in (self.train, self.validation):
            digest.update(str(len(split)).encode())
            for text in split:
                digest.update(hashlib.sha256(text.encode("utf-8", errors="replace")).digest())
        return digest.hexdigest()[:16]


# --------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """Where tokenizers and token ids are cached: $FASTMAX_HF_CACHE or ~/.cache/fastmax_hf."""
    return Path(os.environ.get("FASTMAX_HF_CACHE", Path.home() / ".cache" / "fastmax_hf"))


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so concurrent processes never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- corpus


def stdlib_root() -> Path:
    """The directory holding the standard library's pure-Python sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files() -> list[Path]:
    """Every ``.py`` file of the standard library (third-party site-packages excluded),
    sorted by path relative to the stdlib root so the order is the same on every run."""
    root = stdlib_root()
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts]
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def is_validation(key: str, validation_percent: float) -> bool:
    """Deterministic split: a document goes to validation when crc32(key) % 100 < percent.

    crc32 (unlike Python's hash()) is the same on every run and machine, and a split by
    file keeps the lines of one file out of both sides.
    """
    return zlib.crc32(key.encode()) % 100 < validation_percent


def default_corpus(validation_percent: float = DEFAULT_VALIDATION_PERCENT, max_files: int | None = None) -> TextSplits:
    """The embedded default corpus: the standard library's sources, split by file.

    ``max_files`` keeps only the first files in path order (small corpora for tests). The
    held-out evaluation texts (``is_held_out``: the files of ``HELD_OUT_STDLIB_FILES`` and the
    sources of ``pydoc_topics_text``, ``PYDOC_TOPICS_SOURCES``) are never trained on: such a
    file stays in validation if crc32 puts it there, and is left out otherwise.
    """
    root = stdlib_root()
    files = stdlib_source_files()[:max_files]
    if not files:
        raise FileNotFoundError(f"found no .py files under the standard library at {root}")
    train, validation = [], []
    for path in files:
        key = path.relative_to(root).as_posix()
        if is_validation(key, validation_percent):
            validation.append(path.read_text(encoding="utf-8", errors="replace"))
        elif not is_held_out(key):
            train.append(path.read_text(encoding="utf-8", errors="replace"))
    name = f"python{sys.version_info.major}.{sys.version_info.minor}-stdlib" + (f"[:{max_files}]" if max_files else "")
    return TextSplits(name, train, validation)


# --------------------------------------------------------------------------- held-out texts of a real model's conversion

# Converting a pretrained model (issue 18, SmolLM2-135M) is evaluated on texts it is never trained
# on, all of them on every Python install: the documentation's topic texts (English prose,
# ``pydoc_data.topics``) and these standard-library sources (paths relative to the stdlib root,
# present in Python 3.10 to 3.14; prose-heavy docstrings and varied code). ``stdlib_training_files``
# leaves them out, and so does the train split of the 30M study's ``default_corpus`` above (which
# otherwise splits by crc32).
HELD_OUT_STDLIB_FILES = (
    "argparse.py",
    "dataclasses.py",
    "email/message.py",
    "fractions.py",
    "heapq.py",
    "http/client.py",
    "json/decoder.py",
    "logging/handlers.py",
    "statistics.py",
    "textwrap.py",
)

# Standard-library sources that carry the topic texts, held out with them: topics.py (a dict literal
# of the same prose) and pdb.py (its commands' help is the text of the "debugger" topic).
PYDOC_TOPICS_SOURCES = ("pdb.py", "pydoc_data/topics.py")

# A directory of the standard library's own test suites: a path component named "test" or
# "tests" (Lib/test/, unittest/test/, lib2to3/tests/, ...) or ending in "_test" (idlelib/idle_test/).
TEST_DIRECTORY_NAMES = ("test", "tests")
TEST_DIRECTORY_SUFFIX = "_test"


def pydoc_topics_text() -> str:
    """The Python documentation's topic texts (``pydoc_data.topics.topics``, a dict of topic name
    -> text, ~120k tokens of English prose with SmolLM2's tokenizer) as one string: the texts in
    sorted order of their topic names, each followed by a blank line ("\\n\\n" between texts)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def held_out_stdlib_files() -> list[Path]:
    """The files of ``HELD_OUT_STDLIB_FILES`` under this Python's stdlib, in that (sorted) order;
    FileNotFoundError naming the ones this Python lacks."""
    root = stdlib_root()
    files = [root / name for name in HELD_OUT_STDLIB_FILES]
    missing = [name for name, path in zip(HELD_OUT_STDLIB_FILES, files) if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out standard-library files missing under {root}: {missing}")
    return files


def held_out_stdlib_texts() -> dict[str, str]:
    """Relative path -> text of every held-out standard-library file, in ``HELD_OUT_STDLIB_FILES`` order."""
    return {name: path.read_text(encoding="utf-8", errors="replace")
            for name, path in zip(HELD_OUT_STDLIB_FILES, held_out_stdlib_files())}


def held_out_corpus(name: str) -> TextSplits:
    """A held-out evaluation corpus as TextSplits with no train split: ``PYDOC_TOPICS`` (the one
    document of ``pydoc_topics_text``) or ``HELD_OUT_STDLIB`` (the files of ``HELD_OUT_STDLIB_FILES``,
    one document each, in that order)."""
    if name == PYDOC_TOPICS:
        return TextSplits(name, [], [pydoc_topics_text()])
    if name == HELD_OUT_STDLIB:
        return TextSplits(name, [], list(held_out_stdlib_texts().values()))
    raise ValueError(f"unknown held-out corpus {name!r}; choose one of {list(HELD_OUT_CORPORA)}")


def is_held_out(relative_path: str) -> bool:
    """Whether a stdlib path (relative, posix) holds held-out evaluation text: one of
    ``HELD_OUT_STDLIB_FILES`` or ``PYDOC_TOPICS_SOURCES``."""
    return relative_path in HELD_OUT_STDLIB_FILES or relative_path in PYDOC_TOPICS_SOURCES


def is_in_test_directory(relative_path: str) -> bool:
    """Whether a stdlib path (relative, posix) lies in a test-suite directory (see ``TEST_DIRECTORY_NAMES``)."""
    directories = relative_path.split("/")[:-1]
    return any(d in TEST_DIRECTORY_NAMES or d.endswith(TEST_DIRECTORY_SUFFIX) for d in directories)


def stdlib_training_files() -> list[Path]:
    """The standard library's ``.py`` files a conversion may train on: all of ``stdlib_source_files``
    (sorted by relative path, site-packages excluded) but the held-out ones (``is_held_out``) and
    test-suite directories."""
    root = stdlib_root()
    held_out_stdlib_files()  # fail on a Python that lacks one, rather than hold out fewer files
    files = []
    for path in stdlib_source_files():
        rel = path.relative_to(root).as_posix()
        if not is_held_out(rel) and not is_in_test_directory(rel):
            files.append(path)
    return files


def iter_stdlib_training_texts():
    """(relative path, text) of every ``stdlib_training_files`` file, in that order, read lazily."""
    root = stdlib_root()
    for path in stdlib_training_files():
        yield path.relative_to(root).as_posix(), path.read_text(encoding="utf-8", errors="replace")


# --------------------------------------------------------------------------- docstring prose

# English prose that ships with installed packages: the docstrings of their modules, classes and
# functions (argument descriptions, explanations, examples), for a conversion whose evaluation
# texts are prose while the default corpus is code. These packages are dependencies of this one
# or of torch, so wherever fastmax_hf runs they are there (their versions name the corpus).
DOCSTRINGS = "docstrings"
DOCSTRING_PACKAGES = ("transformers", "torch", "numpy", "accelerate")
MIN_DOCSTRING_CHARS = 200  # shorter ones are mostly one-line summaries
CORPUS_SEPARATOR = "+"  # "default+docstrings": the documents of both built-in corpora


def package_root(name: str) -> Path:
    """The directory of an installed package; ModuleNotFoundError naming it if it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name!r} is not installed (needed by the {DOCSTRINGS!r} corpus)")
    return Path(list(spec.submodule_search_locations)[0])


def file_docstrings(text: str, min_chars: int = MIN_DOCSTRING_CHARS) -> list[str]:
    """The docstrings of a Python source's module, classes and functions, in source order, those
    of at least ``min_chars`` characters (cleaned of indentation); [] for a file that does not
    parse."""
    import ast

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    docs = (ast.get_docstring(n) for n in nodes)
    return [d for d in docs if d and len(d) >= min_chars]


def _path_docstrings(path: Path) -> list[str]:
    return file_docstrings(path.read_text(encoding="utf-8", errors="replace"))


def _docstrings_of_files(files: list[Path]) -> list[list[str]]:
    """``file_docstrings`` of every file, in order. Parsing is most of the time (about 100 MB of
    source in transformers and torch: over a minute on one core), so large lists are parsed by
    forked worker processes where the platform forks (they only read and parse files)."""
    import multiprocessing

    workers = min(16, os.cpu_count() or 1)
    if len(files) < 256 or workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_path_docstrings(f) for f in files]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        return pool.map(_path_docstrings, files, chunksize=16)


def docstring_corpus(validation_percent: float = DEFAULT_VALIDATION_PERCENT,
                     packages: tuple[str, ...] = DOCSTRING_PACKAGES, max_files: int | None = None) -> TextSplits:
    """The docstrings of installed ``packages`` as documents, one per source file (its docstrings
    joined by blank lines), files in sorted path order, split by file as ``default_corpus`` is.
    A docstring repeated verbatim (copied between model files) is kept only where it first
    appears, so no text is in both splits. ``max_files`` keeps the first files of each package."""
    import importlib.metadata

    train, validation, seen, versions = [], [], set(), []
    for package in packages:
        root = package_root(package)
        try:
            versions.append(f"{package}-{importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(package)
        files = sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix())[:max_files]
        for path, docstrings in zip(files, _docstrings_of_files(files)):
            kept = []
            for doc in docstrings:
                digest = hashlib.sha256(doc.encode("utf-8", errors="replace")).digest()
                if digest not in seen:
                    seen.add(digest)
                    kept.append(doc)
            if kept:
                key = f"{package}/{path.relative_to(root).as_posix()}"
                (validation if is_validation(key, validation_percent) else train).append("\n\n".join(kept))
    if not train and not validation:
        raise FileNotFoundError(f"no docstrings of {MIN_DOCSTRING_CHARS}+ characters in {list(packages)}")
    return TextSplits(f"{DOCSTRINGS}[{','.join(versions)}]" + (f"[:{max_files}]" if max_files else ""),
                      train, validation)


def combined_corpus(splits: list[TextSplits]) -> TextSplits:
    """The documents of several corpora, in the order given, as one corpus."""
    return TextSplits(CORPUS_SEPARATOR.join(s.name for s in splits),
                      [t for s in splits for t in s.train], [t for s in splits for t in s.validation])


# --------------------------------------------------------------------------- other datasets


def looks_like_local_path(dataset: str) -> bool:
    """A local file or directory: it exists, or its name ends with a data-file suffix."""
    return os.path.exists(dataset) or Path(dataset).suffix.lower() in LOCAL_BUILDERS


def local_data_files(dataset: str, argument: str = "--dataset") -> tuple[str, list[str]]:
    """The `datasets` builder and file list for a local file, a directory, or a
    comma-separated list of files (all of one format). Errors name ``argument``."""
    paths = [Path(p) for p in dataset.split(",")]
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(f for f in path.rglob("*") if f.suffix.lower() in LOCAL_BUILDERS)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{argument}: no such file or directory: {path}")
    if not files:
        raise FileNotFoundError(f"{argument}: no data files ({', '.join(sorted(LOCAL_BUILDERS))}) in {dataset}")
    builders = {LOCAL_BUILDERS.get(f.suffix.lower()) for f in files}
    if None in builders or len(builders) != 1:
        suffixes = sorted({f.suffix for f in files})
        raise ValueError(
            f"{argument}: files must share one format among {sorted(LOCAL_BUILDERS)}, got suffixes {suffixes}"
        )
    return builders.pop(), [str(f) for f in files]


def _import_datasets(argument: str, dataset: str):
    """`datasets` is needed only for non-default data, so import it only then."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"{argument} {dataset!r} is read with the `datasets` package, which is not installed: "
                          "pip install datasets") from err
    return datasets


def _documents(split, text_column: str, where: str) -> list[str]:
    if text_column not in split.column_names:
        raise ValueError(f"{where} has no column {text_column!r} (columns: {split.column_names}); set --text_column")
    return [t for t in split[text_column] if isinstance(t, str) and t]


def split_documents(name: str, documents: list[str], validation_percent: float) -> TextSplits:
    """Split a list of documents by the crc32 of their index (see ``is_validation``)."""
    train, validation = [], []
    for i, text in enumerate(documents):
        (validation if is_validation(f"{name}/{i}", validation_percent) else train).append(text)
    if not validation and len(train) > 1:  # tiny inputs: keep at least one validation document
        validation.append(train.pop())
    return TextSplits(name, train, validation)


def load_datasets_source(
    dataset: str, text_column: str = "text", validation_percent: float = DEFAULT_VALIDATION_PERCENT,
    config_name: str | None = None, argument: str = "--dataset", local: bool | None = None,
) -> TextSplits:
    """Documents from a hub dataset or local files via `datasets`.

    A "validation" (else "test") split is used as is; otherwise the "train" split is
    divided by ``split_documents``. ``local``: True reads ``dataset`` as local files, None
    guesses (``looks_like_local_path``). Errors name ``argument``, the option that gave ``dataset``.
    """
    datasets = _import_datasets(argument, dataset)
    if local or (local is None and looks_like_local_path(dataset)):
        builder, files = local_data_files(dataset, argument)
        loaded = datasets.load_dataset(builder, data_files=files)
    else:
        try:
            loaded = datasets.load_dataset(dataset, config_name)
        except Exception as err:  # the hub raises many kinds; say what was asked for
            raise ValueError(
                f"{argument} {dataset!r} is neither 'default', an existing local file/directory, nor a dataset "
                f"`datasets.load_dataset` can load ({type(err).__name__}: {err})"
            ) from err
    if "train" not in loaded:
        raise ValueError(f"{argument} {dataset!r} has no 'train' split (splits: {list(loaded)})")
    train = _documents(loaded["train"], text_column, f"{argument} {dataset!r}")
    held_out = next((s for s in ("validation", "test") if s in loaded), None)
    if held_out is None:
        return split_documents(dataset, train, validation_percent)
    return TextSplits(dataset, train, _documents(loaded[held_out], text_column, f"{argument} {dataset!r}"))


BUILTIN_CORPORA = (DEFAULT, DOCSTRINGS)  # the training corpora that need no download, joinable with "+"


def load_text_dataset(
    dataset: str = DEFAULT, text_column: str = "text", validation_percent: float = DEFAULT_VALIDATION_PERCENT,
    max_files: int | None = None, config_name: str | None = None, argument: str = "--dataset",
) -> TextSplits:
    """"default" (the standard-library corpus), "docstrings" (the prose of installed packages'
    docstrings), built-in corpora joined by "+" ("default+docstrings"), one of
    ``HELD_OUT_CORPORA`` (evaluation texts: a validation split only), a hub name, or local data
    files (errors name ``argument``)."""
    if dataset == DEFAULT:
        return default_corpus(validation_percent, max_files=max_files)
    if dataset == DOCSTRINGS:
        return docstring_corpus(validation_percent, max_files=max_files)
    if dataset in HELD_OUT_CORPORA:
        return held_out_corpus(dataset)
    parts = dataset.split(CORPUS_SEPARATOR)
    if len(parts) > 1 and not looks_like_local_path(dataset):
        unknown = [p for p in parts if p not in BUILTIN_CORPORA]
        if unknown or len(set(parts)) != len(parts):
            raise ValueError(f"{argument} {dataset!r}: '{CORPUS_SEPARATOR}' joins built-in corpora, each once "
                             f"({', '.join(BUILTIN_CORPORA)}); unknown or repeated: {unknown or parts}")
        return combined_corpus([load_text_dataset(p, text_column, validation_percent, max_files) for p in parts])
    return load_datasets_source(dataset, text_column, validation_percent, config_name, argument)


# --------------------------------------------------------------------------- tokenizer


def train_bpe_tokenizer(texts: list[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """A byte-level BPE tokenizer (GPT-2 style: any byte sequence is encodable) trained on ``texts``.

    Returns a ``tokenizers.Tokenizer``; ``END_OF_TEXT`` is its only special token (id 0).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def wrap_tokenizer(tokenizer):
    """A ``tokenizers.Tokenizer`` as a transformers ``PreTrainedTokenizerFast`` (saveable with
    save_pretrained, loadable with AutoTokenizer). End-of-text doubles as bos, eos and pad."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
    )


def default_tokenizer(
    vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: str | Path | None = None, corpus: TextSplits | None = None,
):
    """The default tokenizer: BPE trained on the train split of ``corpus`` (the default
    corpus when None), cached under ``cache_dir`` by corpus fingerprint and vocab size."""
    from tokenizers import Tokenizer

    corpus = corpus if corpus is not None else default_corpus()
    path = Path(cache_dir or default_cache_dir()) / f"tokenizer-{corpus.fingerprint()}-{vocab_size}.json"
    if path.exists():
        return wrap_tokenizer(Tokenizer.from_file(str(path)))
    tokenizer = train_bpe_tokenizer(corpus.train, vocab_size)
    _atomic_write_bytes(path, tokenizer.to_str().encode())
    return wrap_tokenizer(tokenizer)


def load_tokenizer(name_or_path: str = DEFAULT, cache_dir: str | Path | None = None, vocab_size: int = DEFAULT_VOCAB_SIZE):
    """"default" (see ``default_tokenizer``) or any hub id / local path AutoTokenizer can load.

    A tokenizer without an eos token cannot separate packed documents, so it is refused.
    """
    if name_or_path == DEFAULT:
        return default_tokenizer(vocab_size, cache_dir)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except Exception as err:
        raise ValueError(
            f"--tokenizer {name_or_path!r}: not 'default', a local tokenizer directory, nor a hub id that "
            f"AutoTokenizer can load ({type(err).__name__}: {err})"
        ) from err
    if tokenizer.eos_token_id is None:
        raise ValueError(f"--tokenizer {name_or_path!r} has no eos token, which packing needs between documents")
    return tokenizer


# --------------------------------------------------------------------------- tokens and blocks


def encode_documents(texts: list[str], tokenizer) -> np.ndarray:
    """One int32 stream: every document's token ids followed by eos. (total_tokens,)"""
    eos = tokenizer.eos_token_id
    if not texts:
        return np.zeros(0, dtype=np.int32)
    # verbose=False: documents longer than a hub tokenizer's model_max_length are fine here
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return np.concatenate([np.asarray([*doc, eos], dtype=np.int32) for doc in ids])


def cached_token_stream(texts: list[str], tokenizer, key: str, cache_dir: str | Path | None = None) -> np.ndarray:
    """``encode_documents`` memoised on disk as .npy under a key naming corpus, split and tokenizer."""
    path = Path(cache_dir or default_cache_dir()) / f"tokens-{key}.npy"
    if path.exists():
        return np.load(path)
    stream = encode_documents(texts, tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
    np.save(tmp, stream)
    os.replace(tmp, path)
    return stream


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary and class, to key cached token ids."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((type(tokenizer).__name__ + vocab).encode()).hexdigest()[:16]


def pack_into_blocks(stream: np.ndarray | torch.Tensor, block_size: int) -> torch.Tensor:
    """Cut a token stream into non-overlapping blocks, dropping the incomplete tail.

    (total_tokens,) -> (total_tokens // block_size, block_size) int64. Documents run across
    block boundaries, as in GPT-style pretraining; causal LM labels are the block itself.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    stream = torch.as_tensor(np.asarray(stream), dtype=torch.int64)
    n_blocks = stream.numel() // block_size
    return stream[: n_blocks * block_size].view(n_blocks, block_size)


def token_blocks(
    splits: TextSplits, tokenizer, block_size: int, cache_dir: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Packed blocks of both splits: {"train": (N, block_size), "validation": (M, block_size)}.

    Raises ValueError when a split is too small for a single block.
    """
    tok_key = tokenizer_fingerprint(tokenizer)
    blocks = {}
    for split in ("train", "validation"):
        stream = cached_token_stream(getattr(splits, split), tokenizer, f"{splits.fingerprint()}-{tok_key}-{split}", cache_dir)
        blocks[split] = pack_into_blocks(stream, block_size)
        if len(blocks[split]) == 0:
            raise ValueError(
                f"the {split} split of {splits.name!r} has {len(stream)} tokens, fewer than one block of {block_size}"
            )
    return blocks


# --------------------------------------------------------------------------- models

# Llama-shaped configs with grouped-query attention (num_key_value_heads < num_attention_heads).
BUILTIN_MODELS = {
    # tests: a few hundred thousand parameters
    "llama-tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    # the bare CPU run: ~3M parameters besides the embeddings
    "llama-small": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2),
    # the GPU experiment: ~23M parameters besides the embeddings (head_dim 64)
    "llama-30m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2),
}
DEFAULT_MODEL = "llama-small"


def builtin_model_config(name: str = DEFAULT_MODEL, vocab_size: int = DEFAULT_VOCAB_SIZE, max_position_embeddings: int = 4096,
                         eos_token_id: int = 0):
    """A ``LlamaConfig`` for one of ``BUILTIN_MODELS`` with the tokenizer's vocabulary size."""
    from transformers import LlamaConfig

    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
        tie_word_embeddings=True,
        **BUILTIN_MODELS[name],
    )
