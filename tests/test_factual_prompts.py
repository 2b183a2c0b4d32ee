"""scripts/factual_prompts.py and its fixed prompts (scripts/factual_prompts.json), on a tiny random
Llama: it answers none of them, so the report's shape is checked, not its answers."""

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastmax_hf import data

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # as the scripts put it, run as files

import factual_prompts  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tokenizer = data.wrap_tokenizer(data.train_bpe_tokenizer(
        [entry["prompt"] for entry in factual_prompts.load_factual_prompts()] * 5, vocab_size=300))
    torch.manual_seed(0)
    config = data.builtin_model_config("llama-tiny", vocab_size=len(tokenizer), max_position_embeddings=128,
                                       eos_token_id=tokenizer.eos_token_id)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa"), tokenizer


def test_the_fixed_prompts_are_a_dozen_distinct_prompts_each_with_answers():
    prompts = factual_prompts.load_factual_prompts()
    assert len(prompts) == 12
    assert len({p["prompt"] for p in prompts}) == 12
    assert prompts[0] == {"prompt": "The capital of France is", "answers": ["Paris"]}
    assert all(p["answers"] and all(isinstance(a, str) and a for a in p["answers"]) for p in prompts)


def test_the_report_has_one_row_per_prompt_in_order(tiny):
    model, tokenizer = tiny
    prompts = factual_prompts.load_factual_prompts()
    report = factual_prompts.ask_factual_prompts(model, tokenizer, prompts, max_new_tokens=4)
    assert set(report) == {"max_new_tokens", "answered", "total", "prompts"}
    assert report["max_new_tokens"] == 4 and report["total"] == 12
    assert [row["prompt"] for row in report["prompts"]] == [p["prompt"] for p in prompts]
    for row, entry in zip(report["prompts"], prompts):
        assert set(row) == {"prompt", "answers", "completion", "correct"}
        assert row["answers"] == entry["answers"] and isinstance(row["completion"], str)
        assert row["correct"] == any(answer in row["completion"] for answer in entry["answers"])
    assert report["answered"] == sum(row["correct"] for row in report["prompts"])
    # greedy: the same model gives the same report
    assert factual_prompts.ask_factual_prompts(model, tokenizer, prompts, max_new_tokens=4) == report


def test_a_completion_containing_an_answer_counts(tiny):
    """A prompt whose answer is whatever the model says: the check itself, independent of the model."""
    model, tokenizer = tiny
    said = factual_prompts.ask_factual_prompts(model, tokenizer, [{"prompt": "The capital of France is",
                                                                   "answers": ["?"]}], max_new_tokens=3)
    completion = said["prompts"][0]["completion"]
    if not completion:
        pytest.fail("the tiny model generated an empty completion; the test needs some text to match")
    again = factual_prompts.ask_factual_prompts(model, tokenizer, [{"prompt": "The capital of France is",
                                                                    "answers": ["never said", completion]}],
                                                max_new_tokens=3)
    assert again["answered"] == 1 and again["prompts"][0]["correct"] is True


def test_bad_prompt_files_and_arguments_are_refused(tmp_path, tiny):
    with pytest.raises(ValueError, match="no such file"):
        factual_prompts.load_factual_prompts(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"prompts": [{"prompt": "The capital of France is", "answers": []}]}))
    with pytest.raises(ValueError, match="entry 0"):
        factual_prompts.load_factual_prompts(bad)
    bad.write_text(json.dumps(["not an object"]))
    with pytest.raises(ValueError, match="'prompts' list"):
        factual_prompts.load_factual_prompts(bad)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        factual_prompts.ask_factual_prompts(*tiny, [], max_new_tokens=0)
