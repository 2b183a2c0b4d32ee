"""fastmax_hf.data: the embedded corpus, the cached tokenizer, dataset loaders, packing, configs."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastmax_hf import data

VOCAB = 512  # small vocabularies train in about a second


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fastmax_cache")


@pytest.fixture(scope="module")
def tokenizer(cache_dir):
    return data.load_tokenizer("default", cache_dir, VOCAB)


def test_stdlib_files_are_sorted_and_exclude_site_packages():
    files = data.stdlib_source_files()
    root = data.stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert rel == sorted(rel)
    assert not any("site-packages" in r for r in rel)
    assert "os.py" in rel


def test_default_corpus_is_deterministic_and_split_by_file():
    a = data.default_corpus(max_files=120)
    b = data.default_corpus(max_files=120)
    assert a.train == b.train and a.validation == b.validation
    assert a.fingerprint() == b.fingerprint()
    root = data.stdlib_root()
    first = [f.relative_to(root).as_posix() for f in data.stdlib_source_files()[:120]]
    held_out_in_train = [n for n in first if data.is_held_out(n) and not data.is_validation(n, data.DEFAULT_VALIDATION_PERCENT)]
    assert "argparse.py" in held_out_in_train  # left out: the held-out texts are never trained on
    assert len(a.train) + len(a.validation) == 120 - len(held_out_in_train)
    assert a.validation and a.train
    assert not set(a.validation) & set(a.train)  # no file on both sides (files are distinct texts)
    # the split of a file does not depend on which other files are in the corpus
    c = data.default_corpus(max_files=60)
    assert set(c.validation) <= set(a.validation) and set(c.train) <= set(a.train)


def test_is_validation_matches_the_requested_fraction():
    keys = [f"doc/{i}" for i in range(5000)]
    frac = sum(data.is_validation(k, 10) for k in keys) / len(keys)
    assert 0.08 < frac < 0.12
    assert [data.is_validation(k, 10) for k in keys[:50]] == [data.is_validation(k, 10) for k in keys[:50]]


def test_split_documents_keeps_a_validation_document():
    splits = data.split_documents("tiny", ["a", "b", "c"], validation_percent=0)
    assert len(splits.validation) == 1 and len(splits.train) == 2


def test_default_tokenizer_round_trips_source_and_is_cached(cache_dir, tokenizer):
    source = data.default_corpus(max_files=3).train[0]
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == source  # byte-level BPE is lossless
    assert len(tokenizer) == VOCAB
    assert tokenizer.eos_token == data.END_OF_TEXT and tokenizer.eos_token_id == 0
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    cached = list(cache_dir.glob(f"tokenizer-*-{VOCAB}.json"))
    assert len(cached) == 1
    again = data.load_tokenizer("default", cache_dir, VOCAB)  # read back from the cache
    assert again.get_vocab() == tokenizer.get_vocab()


def test_tokenizer_saves_and_reloads_with_autotokenizer(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    reloaded = data.load_tokenizer(str(tmp_path))
    text = "def f(x):\n    return x ** 2  # ünïcode\n"
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert isinstance(AutoTokenizer.from_pretrained(tmp_path).eos_token_id, int)


def test_unknown_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="--tokenizer"):
        data.load_tokenizer(str(tmp_path / "missing"))


def test_pack_into_blocks_drops_the_tail():
    blocks = data.pack_into_blocks(np.arange(23, dtype=np.int32), 5)
    assert blocks.shape == (4, 5) and blocks.dtype == torch.int64
    assert blocks.flatten().tolist() == list(range(20))
    with pytest.raises(ValueError, match="block_size"):
        data.pack_into_blocks(np.arange(10), 1)


def test_encode_documents_separates_documents_with_eos(tokenizer):
    stream = data.encode_documents(["a = 1", "b = 2"], tokenizer)
    eos = tokenizer.eos_token_id
    assert (stream == eos).sum() == 2 and stream[-1] == eos
    first = tokenizer("a = 1", add_special_tokens=False)["input_ids"]
    assert stream[: len(first)].tolist() == first


def test_token_blocks_are_cached_and_shaped(cache_dir, tokenizer):
    splits = data.default_corpus(max_files=40)
    blocks = data.token_blocks(splits, tokenizer, 64, cache_dir)
    assert blocks["train"].shape[1] == 64 and blocks["validation"].shape[1] == 64
    assert len(blocks["train"]) > len(blocks["validation"]) > 0
    assert int(blocks["train"].max()) < VOCAB
    assert list(cache_dir.glob("tokens-*-train.npy"))
    again = data.token_blocks(splits, tokenizer, 64, cache_dir)
    assert torch.equal(again["train"], blocks["train"])


def test_token_blocks_refuse_a_split_smaller_than_a_block(cache_dir, tokenizer):
    splits = data.TextSplits("tiny", ["x = 1\n" * 50], ["y = 2\n"])
    with pytest.raises(ValueError, match="fewer than one block"):
        data.token_blocks(splits, tokenizer, 64, cache_dir)


def _write_local_files(tmp_path):
    docs = [f"def f{i}(x):\n    return x + {i}\n" for i in range(40)]
    (tmp_path / "corpus.txt").write_text("\n".join(docs))
    with open(tmp_path / "corpus.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"content": d}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs}), tmp_path / "corpus.parquet")
    return docs


def test_local_text_jsonl_and_parquet_files_load(tmp_path):
    docs = _write_local_files(tmp_path)
    text = data.load_text_dataset(str(tmp_path / "corpus.txt"))
    assert sum(len(s) for s in (text.train, text.validation)) == sum(d.count("\n") for d in docs)  # one per line
    jsonl = data.load_text_dataset(str(tmp_path / "corpus.jsonl"), text_column="content")
    parquet = data.load_text_dataset(str(tmp_path / "corpus.parquet"))
    for splits in (jsonl, parquet):
        assert sorted(splits.train + splits.validation) == sorted(docs)
        assert splits.validation
    assert jsonl.train == data.load_text_dataset(str(tmp_path / "corpus.jsonl"), text_column="content").train


def test_bad_dataset_inputs_are_clear_errors(tmp_path):
    _write_local_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        data.load_text_dataset(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="column 'text'"):
        data.load_text_dataset(str(tmp_path / "corpus.jsonl"))
    with pytest.raises(ValueError, match="one format"):
        data.load_text_dataset(f"{tmp_path / 'corpus.txt'},{tmp_path / 'corpus.parquet'}")


def test_default_corpus_and_tokenizer_do_not_import_datasets(cache_dir):
    # The GPU machine has no `datasets`: the default path must not need it.
    code = (
        "import sys; from fastmax_hf import data; "
        f"s = data.load_text_dataset(max_files=30); t = data.load_tokenizer('default', {str(cache_dir)!r}, {VOCAB}); "
        f"b = data.token_blocks(s, t, 32, {str(cache_dir)!r}); "
        "assert 'datasets' not in sys.modules, 'datasets was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _fake_package(root, name="fakedocs"):
    """A package of three files: long docstrings (one of them copied into a second file), a
    short one, code with no docstring, and a file that does not parse."""
    long_a = " ".join(["Compute the thing."] * 20)
    long_b = " ".join(["Explain how the other thing works, with its arguments and what it returns."] * 4)
    pkg = root / name
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(f'"""{long_a}"""\n\nclass A:\n    """short"""\n\n    def f(self):\n        """{long_b}"""\n        return 1\n')
    (pkg / "sub" / "copy.py").write_text(f'def g():\n    """{long_b}"""\n\nx = 1  # code, not prose\n')
    (pkg / "broken.py").write_text("def (:\n")
    return long_a, long_b


def test_docstring_corpus_holds_the_long_docstrings_once_split_by_file(tmp_path, monkeypatch):
    long_a, long_b = _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert data.file_docstrings(f'"""{long_a}"""\ndef f():\n    """short"""\n') == [long_a]
    assert data.file_docstrings("def (:") == []
    corpus = data.docstring_corpus(validation_percent=0, packages=("fakedocs",))
    assert corpus.validation == [] and corpus.name.startswith("docstrings[fakedocs")
    # one document per file with docstrings, in path order; the copied docstring only where it first appears
    assert corpus.train == [long_a + "\n\n" + long_b]
    everything = data.docstring_corpus(validation_percent=100, packages=("fakedocs",))
    assert everything.train == [] and everything.validation == corpus.train
    assert "x = 1" not in "".join(corpus.train)
    with pytest.raises(ModuleNotFoundError, match="no_such_package_here"):
        data.docstring_corpus(packages=("no_such_package_here",))


def test_builtin_corpora_join_with_a_plus(tmp_path, monkeypatch):
    _fake_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(data, "DOCSTRING_PACKAGES", ("fakedocs",))
    monkeypatch.setattr(data.docstring_corpus, "__defaults__",
                        (data.DEFAULT_VALIDATION_PERCENT, ("fakedocs",), None))
    stdlib = data.load_text_dataset("default", max_files=20)
    docs = data.load_text_dataset("docstrings", max_files=20)
    both = data.load_text_dataset("default+docstrings", max_files=20)
    assert both.train == stdlib.train + docs.train and both.validation == stdlib.validation + docs.validation
    assert both.name == f"{stdlib.name}+{docs.name}" and both.fingerprint() != stdlib.fingerprint()
    for bad in ("default+nonsense", "default+default"):
        with pytest.raises(ValueError, match="joins built-in corpora"):
            data.load_text_dataset(bad, argument="--dataset_name")


def test_the_docstring_corpus_of_the_installed_packages_is_prose_and_trains_nothing_held_out():
    corpus = data.docstring_corpus(packages=("accelerate",))  # the smallest of DOCSTRING_PACKAGES
    texts = corpus.train + corpus.validation
    assert len(texts) > 20 and corpus.validation and sum(map(len, texts)) > 50_000
    topics = data.pydoc_topics_text()
    for text in corpus.train[:50]:  # none of it is evaluation text
        assert text[:200] not in topics


def test_builtin_configs_use_grouped_query_attention():
    for name in data.BUILTIN_MODELS:
        config = data.builtin_model_config(name, vocab_size=VOCAB)
        assert config.model_type == "llama" and config.vocab_size == VOCAB
        assert config.num_key_value_heads < config.num_attention_heads
    with pytest.raises(ValueError, match="built-in"):
        data.builtin_model_config("llama-huge")


# --------------------------------------------------------------------------- held-out corpora by name


def test_held_out_corpora_are_validation_only_and_hold_the_held_out_texts():
    topics = data.load_text_dataset(data.PYDOC_TOPICS)
    assert topics.train == [] and topics.validation == [data.pydoc_topics_text()]
    stdlib = data.load_text_dataset(data.HELD_OUT_STDLIB)
    assert stdlib.train == [] and stdlib.validation == list(data.held_out_stdlib_texts().values())
    assert len(stdlib.validation) == len(data.HELD_OUT_STDLIB_FILES)
    assert topics.fingerprint() != stdlib.fingerprint()
    # none of it reaches the default corpus's train split
    train = set(data.default_corpus().train)
    assert not train & set(stdlib.validation)
    with pytest.raises(ValueError, match="unknown held-out corpus 'nope'"):
        data.held_out_corpus("nope")
