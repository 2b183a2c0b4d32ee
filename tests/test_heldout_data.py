"""fastmax_hf.data's held-out evaluation texts (pydoc_data.topics, a fixed list of standard-library
files) and the training corpus that leaves them out."""

from pydoc_data.topics import topics

from fastmax_hf import data


def test_pydoc_topics_text_joins_every_topic_in_sorted_order_and_is_deterministic():
    text = data.pydoc_topics_text()
    assert text == data.pydoc_topics_text()
    assert len(text) > 100_000
    names = sorted(topics)
    assert text == "\n\n".join(topics[name] for name in names)
    assert text.startswith(topics[names[0]]) and text.endswith(topics[names[-1]])


def test_held_out_files_exist_are_non_empty_and_read_the_same_twice():
    root = data.stdlib_root()
    files = data.held_out_stdlib_files()
    assert len(files) == len(data.HELD_OUT_STDLIB_FILES) >= 10
    assert [f.relative_to(root).as_posix() for f in files] == list(data.HELD_OUT_STDLIB_FILES)
    texts = data.held_out_stdlib_texts()
    assert list(texts) == list(data.HELD_OUT_STDLIB_FILES)
    assert all(len(t) > 1000 for t in texts.values())
    assert texts == data.held_out_stdlib_texts()


def test_the_training_corpus_never_holds_a_held_out_file_nor_a_test_directory():
    root = data.stdlib_root()
    names = [f.relative_to(root).as_posix() for f in data.stdlib_training_files()]
    assert len(names) > 300
    assert names == sorted(names)
    assert not set(names) & set(data.HELD_OUT_STDLIB_FILES)
    assert not any(data.is_in_test_directory(n) for n in names)
    assert not any(n.startswith("test/") or "/tests/" in n or "idle_test/" in n for n in names)
    assert "os.py" in names and "json/encoder.py" in names  # the rest is there: json/decoder.py alone is held out
    # every stdlib file is in exactly one of: training, held out, a test directory
    everything = [f.relative_to(root).as_posix() for f in data.stdlib_source_files()]
    rest = [n for n in everything if n not in set(names)]
    assert all(data.is_held_out(n) or data.is_in_test_directory(n) for n in rest)


def test_the_training_iterator_is_deterministic_and_yields_no_held_out_text():
    first = list(data.iter_stdlib_training_texts())
    assert first == list(data.iter_stdlib_training_texts())
    root = data.stdlib_root()
    assert [name for name, _ in first] == [f.relative_to(root).as_posix() for f in data.stdlib_training_files()]
    held_out = set(data.held_out_stdlib_texts().values())
    assert not any(text in held_out for _, text in first)
    assert sum(len(text) for _, text in first) > 1_000_000


def test_test_directories_are_recognised_by_path_component():
    assert data.is_in_test_directory("test/test_os.py")
    assert data.is_in_test_directory("unittest/test/test_case.py")
    assert data.is_in_test_directory("lib2to3/tests/data/foo.py")
    assert data.is_in_test_directory("idlelib/idle_test/test_run.py")
    assert not data.is_in_test_directory("unittest/case.py")
    assert not data.is_in_test_directory("test_like_name.py")  # a file, not a directory
    assert not data.is_in_test_directory("doctest.py")



def _topic_snippets() -> list[str]:
    """Pieces of the topic texts' prose: the first 32 characters of long plain lines (no quotes or
    backslashes, which topics.py escapes), enough to find a topic in any copy of its text."""
    lines = [line.strip() for line in data.pydoc_topics_text().splitlines()]
    plain = [line[:32] for line in lines if len(line) > 60 and not set(line) & set("'\"\\") and line[0].isalpha()]
    return sorted(set(plain))[::5]


def _files_with_topic_text(texts: dict[str, str], snippets: list[str]) -> dict[str, int]:
    """name -> how many snippets its text holds, for texts holding more than two (a couple are
    phrases the stdlib shares with the topics: "During handling of the above exception ...")."""
    counts = {name: sum(s in text for s in snippets) for name, text in texts.items()}
    return {name: n for name, n in counts.items() if n > 2}


def test_the_topic_snippets_find_the_topics_in_their_sources():
    # the check below would see the topic texts in a training stream: these files hold them
    root = data.stdlib_root()
    sources = {name: (root / name).read_text(encoding="utf-8") for name in data.PYDOC_TOPICS_SOURCES}
    snippets = _topic_snippets()
    assert len(snippets) > 300
    assert sum(s in sources["pydoc_data/topics.py"] for s in snippets) > 0.9 * len(snippets)
    assert set(_files_with_topic_text(sources, snippets)) == set(data.PYDOC_TOPICS_SOURCES)


def test_no_held_out_text_is_in_a_training_stream():
    """Neither the conversion corpus (stdlib_training_files) nor the default corpus's train split,
    what scripts/finetune.py trains on by default, holds a held-out file or the topic texts."""
    held_out = set(data.held_out_stdlib_texts().values())
    snippets = _topic_snippets()
    default = data.default_corpus()
    conversion = dict(data.iter_stdlib_training_texts())
    assert not held_out & set(conversion.values()) and not held_out & set(default.train)
    assert _files_with_topic_text(conversion, snippets) == {}
    assert _files_with_topic_text(dict(enumerate(default.train)), snippets) == {}
    assert not set(data.PYDOC_TOPICS_SOURCES) & set(conversion) and "pydoc.py" in conversion
    # the default corpus only loses held-out files from its train split; validation is still by crc32
    root = data.stdlib_root()
    names = [f.relative_to(root).as_posix() for f in data.stdlib_source_files()]
    validation = [n for n in names if data.is_validation(n, data.DEFAULT_VALIDATION_PERCENT)]
    train = [n for n in names if n not in set(validation) and not data.is_held_out(n)]
    assert (len(default.validation), len(default.train)) == (len(validation), len(train))
    assert len(names) - len(validation) - len(train) >= 10  # the held-out files that crc32 put in train


def test_is_held_out_names_the_held_out_files_and_the_topic_sources():
    assert all(data.is_held_out(name) for name in data.HELD_OUT_STDLIB_FILES)
    assert data.is_held_out("pydoc_data/topics.py") and data.is_held_out("pdb.py")
    assert not data.is_held_out("json/encoder.py") and not data.is_held_out("pydoc.py")
