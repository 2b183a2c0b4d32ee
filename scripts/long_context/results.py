"""results.json: the settings its results were made with, reading and writing it, and its "meta".

Layout: {"settings": {"general": ..., <section>: ...}, "perplexity": {implementation: {length: record}},
"passkey": {implementation: {length: {depth: record}}}, "cost": {implementation: {length: record}},
"factual": {implementation: report of factual_prompts.ask_factual_prompts},
"checks": {"cached_decoding": {implementation: record}} (written by the cost section), "meta": ...}.
Lengths and depths are strings (JSON keys): str(length), f"{depth:g}".
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import torch

import fastmax_hf
from factual_prompts import DEFAULT_MAX_NEW_TOKENS
from script_common import fail, max_positions

SECTIONS = ("perplexity", "passkey", "cost", "factual")


def settings(args, device, dtype) -> dict:
    """What stored results depend on: the model and precision, and each section's own options.
    A rerun may only add to results made with the same."""
    return {
        "general": dict(model=args.model, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        dtype=str(dtype).removeprefix("torch."), device=device.type, max_positions=args.max_positions),
        "perplexity": dict(dataset=args.dataset, dataset_config=args.dataset_config, text_column=args.text_column,
                           split=args.split, max_files=args.max_files, documents=args.ppl_documents,
                           document_tokens=args.document_tokens, stride=args.stride),
        "passkey": dict(trials=args.trials, new_tokens=args.passkey_new_tokens, seed=args.seed),
        "cost": dict(decode_tokens=args.decode_tokens, seed=args.seed, repeat=not args.no_repeat),
        "factual": dict(max_new_tokens=DEFAULT_MAX_NEW_TOKENS),
    }


def load_results(path: Path, expected: dict, sections: list[str]) -> dict:
    """results.json as it stands (empty if new). Refuses results made with other general settings,
    or with other options of a section that is to run; records the options of those sections."""
    results = json.loads(path.read_text()) if path.exists() else {"settings": {}}
    stored = results["settings"]
    for part in ["general", *sections]:
        if part in stored and stored[part] != expected[part]:
            differing = {k: (stored[part].get(k), v) for k, v in expected[part].items() if stored[part].get(k) != v}
            fail(f"{path} holds {part} results made with other settings (stored, now): {differing}; "
                 "use another --output_dir, or delete the file")
        stored[part] = expected[part]
    for section in SECTIONS:
        results.setdefault(section, {})
    return results


def save_results(results: dict, path: Path):
    """Write via a temporary file and rename: an interruption never leaves half a file."""
    tmp = path.with_name(f"{path.name}.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    os.replace(tmp, path)


def describe(model, args, accelerator, dtype) -> dict:
    """What was run, where: stored next to the results."""
    import transformers

    device = accelerator.device
    fastmax_options = dataclasses.asdict(fastmax_hf.get_fastmax_config(model.config))
    return dict(
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        processes=accelerator.num_processes, torch=torch.__version__, transformers=transformers.__version__,
        fastmax_hf=fastmax_hf.__version__, python=platform.python_version(), dtype=str(dtype).removeprefix("torch."),
        parameters=sum(p.numel() for p in model.parameters()), model_type=model.config.model_type,
        max_position_embeddings=max_positions(model.config), fastmax=fastmax_options, command=sys.argv,
    )
