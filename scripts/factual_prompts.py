"""The short factual prompts a converted pretrained model should still answer (issue 18), and a
function that asks a model them.

The prompts are fixed in scripts/factual_prompts.json beside this file: a dozen sentence starts
("The capital of France is") each with the answers that count ("Paris"). ``ask_factual_prompts``
generates greedily (no sampling) --max_new_tokens tokens after each prompt, one prompt at a
time (no padding), and a prompt is answered when the completion contains one of its answers as
a case-sensitive substring. Run it on the teacher and on the converted model and compare:

    from factual_prompts import ask_factual_prompts, load_factual_prompts   # scripts/ on sys.path
    report = ask_factual_prompts(model, tokenizer, load_factual_prompts())
    report["answered"], report["total"]        # e.g. 9, 12
    report["prompts"][0]                       # {"prompt", "answers", "completion", "correct"}

Like script_common.py, this module is imported by name by scripts run as files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

PROMPTS_FILE = Path(__file__).resolve().parent / "factual_prompts.json"
DEFAULT_MAX_NEW_TOKENS = 8


def load_factual_prompts(path: str | Path = PROMPTS_FILE) -> list[dict]:
    """The prompts of ``path`` (default: scripts/factual_prompts.json): [{"prompt": str, "answers": [str, ...]}]."""
    path = Path(path)
    try:
        prompts = json.loads(path.read_text())["prompts"]
    except FileNotFoundError:
        raise ValueError(f"factual prompts file {path}: no such file") from None
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"factual prompts file {path}: not a JSON object with a 'prompts' list ({err})") from None
    for i, entry in enumerate(prompts):
        if not (isinstance(entry, dict) and isinstance(entry.get("prompt"), str) and entry["prompt"]
                and isinstance(entry.get("answers"), list) and entry["answers"]
                and all(isinstance(a, str) and a for a in entry["answers"])):
            raise ValueError(f"factual prompts file {path}: entry {i} is not "
                             '{"prompt": a non-empty string, "answers": a non-empty list of non-empty strings}')
    return prompts


@torch.no_grad()
def ask_factual_prompts(model, tokenizer, prompts: list[dict], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
    """Greedy completions of every prompt and which contain an expected answer.

    Returns {"max_new_tokens", "answered": how many were answered, "total", "prompts": [{"prompt",
    "answers", "completion" (the generated text only, special tokens dropped), "correct"}]}, in
    the order of ``prompts``. The model is put in eval mode and left there.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rows = []
    for entry in prompts:
        inputs = tokenizer(entry["prompt"], return_tensors="pt").to(device)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
        completion = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        rows.append(dict(prompt=entry["prompt"], answers=list(entry["answers"]), completion=completion,
                         correct=any(answer in completion for answer in entry["answers"])))
    return dict(max_new_tokens=max_new_tokens, answered=sum(r["correct"] for r in rows), total=len(rows), prompts=rows)
