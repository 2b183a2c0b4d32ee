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
    assert all(n in data.HELD_OUT_STDLIB_FILES or data.is_in_test_directory(n) for n in rest)


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
