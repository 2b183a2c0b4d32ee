"""tools/smollm2_study.py at a tiny size: a random GGUF Llama (the writer of test_gguf_model) in
place of SmolLM2-135M, converted with the hybrid window and evaluated on the held-out texts; the
summary, its ratios to the teacher and the targets come out, and a rerun repeats nothing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_gguf_model import write_tiny_llama_gguf

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "tools" / "smollm2_study.py"


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    gguf_path = tmp / "tiny-llama.gguf"
    write_tiny_llama_gguf(gguf_path)
    argv = [sys.executable, str(STUDY), "--gguf_file", str(gguf_path), "--out_dir", str(tmp / "out"),
            "--runs", "teacher,window", "--jobs", "2", "--block_size", "32", "--batch_size", "2",
            "--max_train_steps", "4", "--window", "8", "--lengths", "32,64", "--passkey_lengths", "320",
            "--depths", "0.5", "--trials", "1", "--ppl_documents", "1", "--mixed_precision", "no",
            "--dtype", "float32", "--cache_dir", str(tmp / "cache"), "--finetune_args", "--max_files 150"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return argv, tmp / "out"


def test_the_summary_has_every_row_its_ratios_and_targets(study):
    _, out = study
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert list(rows) == ["teacher", "swap", "window"]
    for name, row in rows.items():
        for dataset in ("pydoc-topics", "heldout-stdlib"):
            assert set(row["perplexity"][dataset]) == {"32", "64"}
            assert all(ppl > 1 for ppl in row["perplexity"][dataset].values())
        assert set(row["passkey"]) == {"320"} and 0 <= row["passkey"]["320"] <= 1
        assert row["factual"]["total"] == 12
    assert all(r == pytest.approx(1.0) for d in rows["teacher"]["perplexity_over_teacher"].values() for r in d.values())
    swap = rows["swap"]["perplexity"]["pydoc-topics"]["32"]
    assert rows["swap"]["perplexity_over_teacher"]["pydoc-topics"]["32"] == pytest.approx(
        swap / rows["teacher"]["perplexity"]["pydoc-topics"]["32"])
    training = rows["window"]["training"]
    assert training["tokens"] == 4 * 2 * 32 and training["fastmax"]["window"] == 8
    assert training["stdlib_val_ppl"]["after_transfer"] is not None  # distill: a transfer stage first
    assert set(summary["targets"]) == {"window"}
    assert summary["targets"]["window"]["at_most_20M_training_tokens"] is True
    table = (out / "summary.md").read_text()
    assert "Perplexity on pydoc-topics" in table and "| window |" in table
    assert (out / "quality.png").is_file()
    # the converted model reloads as fastmax with its window (the eval ran it through from_pretrained)
    config = json.loads((out / "window" / "model" / "config.json").read_text())
    assert config["fastmax"]["window"] == 8


def test_a_rerun_repeats_nothing(study):
    argv, out = study
    model_results = out / "window" / "model" / "results.json"
    before = model_results.stat().st_mtime_ns
    evaluated = json.loads((out / "window" / "eval_pydoc-topics" / "results.json").read_text())
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert model_results.stat().st_mtime_ns == before  # finetune.py not run again
    again = json.loads((out / "window" / "eval_pydoc-topics" / "results.json").read_text())
    assert again["perplexity"] == evaluated["perplexity"]


def test_unknown_runs_are_refused(tmp_path):
    done = subprocess.run([sys.executable, str(STUDY), "--gguf_file", str(tmp_path / "x.gguf"), "--out_dir",
                           str(tmp_path), "--runs", "teacher,nope"], capture_output=True, text=True)
    assert done.returncode != 0 and "unknown run(s) ['nope']" in done.stderr
