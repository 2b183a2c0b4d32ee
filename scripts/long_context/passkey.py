"""The passkey-retrieval task, on a grid of prompt lengths and depths of the key.

As in Mohtashami & Jaggi (2023), "Landmark Attention", and the papers after it: the filler
"The grass is green. ..." repeated, "The pass key is NNNNN. Remember it. NNNNN is the pass key."
at a depth, then "What is the pass key? The pass key is"; greedy generation, exact match of the
number; accuracy per (length, depth) cell over --trials random keys.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from script_common import fail

from .sweep import free_memory, is_out_of_memory, share, skip_reason

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
        "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    input_ids: list[int]
    text: str
    key: str
    depth: float  # asked for
    key_token: int  # index of the needle's first token


def passkey_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """The task, filler with the needle at ``depth``, and the question, in at most ``length`` tokens.

    Each piece is tokenized alone and the ids are concatenated, so the number of filler
    repetitions that fits is exact and the same for every depth.
    """
    def encode(text, first=False):  # special tokens (e.g. a bos) only at the start
        return tokenizer(text, add_special_tokens=first)["input_ids"]

    task, filler, question = encode(TASK, first=True), encode(FILLER), encode(QUESTION)
    needle = encode(NEEDLE.format(key=key))
    repeats = (length - len(task) - len(needle) - len(question)) // len(filler)
    if repeats < 1:
        raise ValueError(f"a passkey prompt needs more than {length} tokens with this tokenizer "
                         f"(task, needle and question take {len(task) + len(needle) + len(question)}, "
                         f"one filler sentence group {len(filler)})")
    before = round(depth * repeats)
    ids = task + filler * before + needle + filler * (repeats - before) + question
    text = TASK + FILLER * before + NEEDLE.format(key=key) + FILLER * (repeats - before) + QUESTION
    return PasskeyPrompt(ids, text, key, depth, len(task) + len(filler) * before)


def check_shortest_length(args, tokenizer):
    """Before any measurement: the shortest prompt must hold the task, the needle, the question and some filler."""
    try:
        passkey_prompt(tokenizer, args.lengths[0], 0.5, "99999")
    except ValueError as err:
        fail(f"--lengths: {err}")


def random_key(seed: int, length: int, depth: float, trial: int) -> str:
    """A 5-digit key that depends only on the cell and trial: the same on every process and rerun."""
    return str(random.Random(f"{seed}/{length}/{depth}/{trial}").randint(10000, 99999))


def score_answer(answer: str, key: str) -> bool:
    """Exact match: the first number in the generated text is the key."""
    found = re.search(r"\d+", answer)
    return found is not None and found.group() == key


def model_generator(model, tokenizer, new_tokens: int):
    """generate(input_ids (1, N)) -> the decoded continuation, by greedy search.

    The passkey task takes any such callable, so tests can stand in for the model.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    @torch.inference_mode()
    def generate(input_ids: torch.Tensor) -> str:
        input_ids = input_ids.to(model.device)
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new_tokens,
                             do_sample=False, num_beams=1, pad_token_id=pad)  # (1, N + new_tokens)
        return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True)

    return generate


def passkey_trial(generate, tokenizer, length: int, depth: float, key: str) -> dict:
    prompt = passkey_prompt(tokenizer, length, depth, key)
    answer = generate(torch.tensor([prompt.input_ids]))
    return {"key": key, "answer": answer, "correct": score_answer(answer, key), "prompt_tokens": len(prompt.input_ids)}


def passkey_cell(generate, tokenizer, length: int, depth: float, trials: int, seed: int, accelerator=None) -> dict:
    """Accuracy at one (length, depth): trial t runs on process t % num_processes; all gathered."""
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    started = time.perf_counter()
    records, out_of_memory = [], False
    try:
        for trial in range(rank, trials, world):
            key = random_key(seed, length, depth, trial)
            records.append(dict(passkey_trial(generate, tokenizer, length, depth, key), trial=trial))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        out_of_memory = True
    seconds = time.perf_counter() - started
    mine = {"records": records, "out_of_memory": out_of_memory, "seconds": seconds}
    parts = share([mine]) if accelerator else [mine]
    seconds = max(p["seconds"] for p in parts)
    if any(p["out_of_memory"] for p in parts):
        return {"out_of_memory": True, "seconds": seconds}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["trial"])
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "trials": len(records),
            "prompt_tokens": records[0]["prompt_tokens"], "seconds": seconds, "samples": records}


def lengths_summary(done: dict) -> dict:
    """One entry per length measured so far, for ``skip_reason``: a length is skipped (or not) as a
    whole, judged by its slowest cell and whether any cell ran out of memory."""
    summary = {}
    for length, row in done.items():
        cells = [cell for cell in row.values() if "skipped" not in cell]
        if cells:
            summary[length] = {"out_of_memory": any(c.get("out_of_memory") for c in cells),
                               "seconds": max(c.get("seconds", 0.0) for c in cells)}
    return summary


def run(model, tokenizer, args, results, save, accelerator):
    """The section: every implementation at every (length, depth) not yet in ``results``; ``save`` after each."""
    for name in args.attn:
        model.set_attn_implementation(name)
        generate = model_generator(model, tokenizer, args.passkey_new_tokens)
        done = results["passkey"].setdefault(name, {})
        cells = [(length, depth) for length in args.lengths for depth in args.depths]
        bar = tqdm(cells, desc=f"passkey/{name}", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for length, depth in bar:
            row = done.setdefault(str(length), {})
            if f"{depth:g}" in row and "skipped" not in row[f"{depth:g}"]:
                continue
            reason = skip_reason(lengths_summary(done), length, args.max_seconds_per_point)
            if reason:
                row[f"{depth:g}"] = {"skipped": reason}
            else:
                row[f"{depth:g}"] = passkey_cell(generate, tokenizer, length, depth, args.trials, args.seed, accelerator)
                if row[f"{depth:g}"].get("out_of_memory"):
                    free_memory(model.device)
            bar.set_postfix(length=length, depth=depth, acc=row[f"{depth:g}"].get("accuracy"))
            save()
