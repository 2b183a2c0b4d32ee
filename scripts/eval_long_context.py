"""Long-context evaluation: quality, speed and memory of attention implementations on one model.

    python scripts/eval_long_context.py                          # small random Llama, stdlib corpus, CPU ok
    python scripts/eval_long_context.py --model runs/finetune --lengths 1024,2048,4096
    accelerate launch --config_file scripts/accelerate_ddp.yaml scripts/eval_long_context.py ...

For one model (--model: a built-in config, a hub id or a local directory such as one written
by scripts/finetune.py) and several attention implementations (--attn, any name registered
with transformers; `import fastmax_hf` registers "fastmax"), over --lengths:

  perplexity  next-token perplexity on long documents (--dataset: the embedded stdlib corpus,
              a hub name or local files; the --split's documents joined by eos and cut into
              --ppl_documents of --document_tokens, by default the longest length), by sliding
              windows of each length moving by --stride (default half the length): every token
              but a document's first is scored once, with the window's earlier tokens as context.
  passkey     the standard passkey-retrieval task: the filler "The grass is green. ..."
              repeated, "The pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth,
              then "What is the pass key? The pass key is"; greedy generation, exact match of
              the number; accuracy on a length x depth grid, --trials random keys per cell.
  cost        prefill time, per-token decode latency (generate(): fastmax from its
              constant-size recurrent state, FastmaxCache; softmax from the key/value cache)
              and peak memory, on random token ids, by length; each point twice (the same
              generate() repeated, see measure_cost; --no_repeat: once). CUDA: CUDA events and
              max_memory_allocated; CPU: wall clock and the sampled resident set size.

Outputs in --output_dir: results.json (rewritten after every measurement), perplexity.png,
passkey_<implementation>.png (heatmaps), cost.png. A rerun skips every point already in
results.json (it refuses results made with other settings). A length where an
implementation runs out of memory is recorded as such and that implementation's longer
lengths are not tried; --max_seconds_per_point skips lengths whose time, extrapolated from
the shorter ones, is over budget. Under `accelerate launch`, documents and trials are split
across processes and gathered; cost is measured on the main process; only it writes files.
Bad arguments (an unknown implementation, a length beyond the model's positions, a passkey
length too short for the prompt) stop the script before any measurement.

Built-in models have random weights: the quality sections then only exercise the pipeline.
Their max_position_embeddings is set to what --lengths needs (RoPE has no position table);
a pretrained model's limit is checked, and can be raised with --max_positions (RoPE models).
On a busy CPU, OMP_NUM_THREADS=1 can be several times faster for the small default model.

GPU runs, one H100 (torch 2.11, transformers 5.17; no `datasets` needed); results in
benchmarks/quality_h100_v2/ and benchmarks/cost_h100_v2/. Quality on a model trained by
scripts/finetune.py: here the distilled model of `python scripts/gpu_finetune_experiment.py
--out_dir runs/ft`, run earlier on the same machine, against its softmax teacher. They were
trained on 512-token blocks, so --max_positions lets RoPE run past them; the stdlib
corpus's validation split holds ~245k tokens, so perplexity takes documents of 64k:

    Q="--max_positions 262400 --max_seconds_per_point 30"
    python scripts/eval_long_context.py --model runs/ft/distill --attn fastmax --sections perplexity \
        --lengths 4096,16384,65536 --document_tokens 65536 $Q --output_dir $OUT/ppl_fastmax
    python scripts/eval_long_context.py --model runs/ft/teacher --attn sdpa --sections perplexity \
        --lengths 4096,16384,65536 --document_tokens 65536 $Q --output_dir $OUT/ppl_teacher_sdpa
    python scripts/eval_long_context.py --model runs/ft/distill --attn fastmax --sections passkey \
        --lengths 4096,16384,65536,262144 --depths 0,0.5,1 --trials 3 $Q --output_dir $OUT/passkey_fastmax
    (and the same for the teacher with --attn sdpa)

Cost on a ~1B-parameter Llama (Llama-3.2-1B shapes, 8k vocabulary: 0.99B parameters; random
weights, bf16), to 1M tokens; sdpa until it runs out of memory or its predicted time per
point (two generate() calls) passes 150 s (it reached 512k in 96 s):

    python scripts/eval_long_context.py --model llama-1b --sections cost \
        --lengths 4096,32768,131072,524288,1048576 --decode_tokens 32 \
        --max_seconds_per_point 150 --output_dir $OUT/cost

The default corpus path never imports `datasets`; no network is needed for built-in models.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import fastmax_hf
from fastmax_hf import data

SECTIONS = ("perplexity", "passkey", "cost")

# Models only this script builds: the cost curves want a realistically sized model, and random
# weights are enough for time and memory. Llama-3.2-1B shapes; with the default 8k-token
# vocabulary, ~1.0B parameters.
EXTRA_MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}
BUILTIN_MODELS = {**data.BUILTIN_MODELS, **EXTRA_MODELS}

# The passkey task as in Mohtashami & Jaggi (2023), "Landmark Attention", and the papers after it.
PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
PASSKEY_NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=data.DEFAULT_MODEL,
                   help=f"a built-in config {sorted(BUILTIN_MODELS)} (random weights), a hub id or a local directory")
    p.add_argument("--tokenizer", default=None,
                   help="'default' (BPE on the stdlib corpus), a hub id or path; default: the model's own, "
                        "or 'default' for built-in models")
    p.add_argument("--vocab_size", type=int, default=data.DEFAULT_VOCAB_SIZE, help="of the default tokenizer")
    p.add_argument("--attn", default="fastmax,sdpa", help="attention implementations, comma-separated")
    p.add_argument("--lengths", default="256,512,1024,2048", help="context lengths in tokens, comma-separated")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"which of {','.join(SECTIONS)} to run")
    p.add_argument("--output_dir", default="runs/eval_long_context")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--max_positions", type=int, default=None,
                   help="set the model's max_position_embeddings (RoPE models) to evaluate past its limit")
    p.add_argument("--max_seconds_per_point", type=float, default=None,
                   help="skip an implementation's longer lengths once one is predicted to take longer")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache_dir", default=None, help="tokenizer / token cache (default $FASTMAX_HF_CACHE or ~/.cache)")
    # perplexity
    p.add_argument("--dataset", default=data.DEFAULT, help="'default' (the stdlib corpus), a hub name, or local files")
    p.add_argument("--dataset_config", default=None, help="the hub dataset's configuration name")
    p.add_argument("--text_column", default="text")
    p.add_argument("--split", default="validation", choices=("validation", "train"),
                   help="which split's documents (validation: held out from scripts/finetune.py's training)")
    p.add_argument("--max_files", type=int, default=None, help="default corpus: only its first N files")
    p.add_argument("--ppl_documents", type=int, default=4, help="how many long documents")
    p.add_argument("--document_tokens", type=int, default=None,
                   help="tokens per document (default: the longest length); fix it to add longer lengths later")
    p.add_argument("--stride", type=int, default=None, help="window step in tokens (default: half the length)")
    # passkey
    p.add_argument("--depths", default="0,0.5,1", help="where the key sits, fractions of the filler")
    p.add_argument("--trials", type=int, default=3, help="passkey prompts (random keys) per length and depth")
    p.add_argument("--passkey_new_tokens", type=int, default=8, help="tokens generated for the answer")
    # cost
    p.add_argument("--decode_tokens", type=int, default=16, help="tokens generated per cost measurement")
    p.add_argument("--no_repeat", action="store_true",
                   help="cost: one generate() per point; by default a second, identical one is timed too (see "
                        "measure_cost: the first pays each attention backend's per-length set-up)")
    args = p.parse_args(argv)
    args.attn = [name.strip() for name in args.attn.split(",") if name.strip()]
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    try:
        args.lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
        args.depths = sorted({float(x) for x in args.depths.split(",") if x.strip()})
    except ValueError as err:
        fail(f"--lengths and --depths take comma-separated numbers ({err})")
    return args


# --------------------------------------------------------------------------- checks before any work


def fail(message: str):
    """Stop with a message instead of a traceback."""
    raise SystemExit(f"eval_long_context.py: error: {message}")


def known_implementations() -> list[str]:
    """Every attention implementation name transformers accepts (fastmax once fastmax_hf is imported)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def check_args(args):
    """Everything that can be checked from the arguments alone."""
    known = known_implementations()
    unknown = [name for name in args.attn if name not in known]
    if unknown or not args.attn:
        fail(f"--attn: unknown attention implementation(s) {unknown or args.attn}; registered: {known}")
    bad = [s for s in args.sections if s not in SECTIONS]
    if bad or not args.sections:
        fail(f"--sections: unknown section(s) {bad or args.sections}; choose from {list(SECTIONS)}")
    if not args.lengths or args.lengths[0] < 2:
        fail(f"--lengths must be integers >= 2, got {args.lengths}")
    if any(not 0.0 <= d <= 1.0 for d in args.depths) or not args.depths:
        fail(f"--depths must be fractions in [0, 1], got {args.depths}")
    for name in ("trials", "ppl_documents", "passkey_new_tokens", "decode_tokens"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be positive")
    if args.stride is not None and args.stride < 1:
        fail("--stride must be positive")
    if args.document_tokens is None:
        args.document_tokens = args.lengths[-1]
    if "perplexity" in args.sections and args.document_tokens < args.lengths[-1]:
        fail(f"--document_tokens {args.document_tokens} is shorter than the longest length {args.lengths[-1]}")


def generated_tokens(args) -> int:
    """How many tokens past the longest prompt the generating sections need to position."""
    counts = {"passkey": args.passkey_new_tokens, "cost": args.decode_tokens}
    return max([counts[s] for s in args.sections if s in counts], default=0)


def max_positions(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    return None


def uses_rope(config) -> bool:
    """Rotary models have no position table: raising max_position_embeddings is just a number."""
    return bool(getattr(config, "rope_parameters", None) or getattr(config, "rope_theta", None))


def check_positions(args, config):
    """Fail fast on a length (plus its generated tokens) the model cannot position."""
    needed = args.lengths[-1] + generated_tokens(args)
    limit = max_positions(config)
    if limit is not None and needed > limit:
        fail(f"--lengths: {args.lengths[-1]} tokens (+{generated_tokens(args)} generated) exceed the model's "
             f"max_position_embeddings {limit}" + ("; pass --max_positions to evaluate past it" if uses_rope(config)
                                                  else " (a learned position table cannot be extended)"))


def check_passkey_lengths(args, tokenizer):
    """The shortest passkey prompt must hold the task, the needle, the question and some filler."""
    try:
        passkey_prompt(tokenizer, args.lengths[0], 0.5, "99999")
    except ValueError as err:
        fail(f"--lengths: {err}")


# --------------------------------------------------------------------------- model and tokenizer


def load_tokenizer(args, accelerator):
    """--tokenizer, else the model's own, else (built-in models) the default BPE, trained once."""
    name = args.tokenizer or (data.DEFAULT if args.model in BUILTIN_MODELS else args.model)
    with accelerator.main_process_first():
        try:
            return data.load_tokenizer(name, args.cache_dir, args.vocab_size)
        except ValueError as err:
            fail(str(err))


def model_config(args, tokenizer):
    """A built-in config sized for --lengths, or the pretrained model's (with --max_positions)."""
    from transformers import AutoConfig, LlamaConfig

    positions = args.max_positions or args.lengths[-1] + generated_tokens(args)
    if args.model in data.BUILTIN_MODELS:
        return data.builtin_model_config(args.model, len(tokenizer), positions, tokenizer.eos_token_id)
    if args.model in EXTRA_MODELS:  # the same conventions as data.builtin_model_config
        eos = tokenizer.eos_token_id
        return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=positions, bos_token_id=eos,
                           eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True, **EXTRA_MODELS[args.model])
    try:
        config = AutoConfig.from_pretrained(args.model)
    except Exception as err:
        fail(f"--model {args.model!r} is not a built-in config {sorted(BUILTIN_MODELS)}, a local model "
             f"directory, nor a hub id that can be loaded ({type(err).__name__}: {err})")
    if args.max_positions is not None:
        if not uses_rope(config):
            fail(f"--max_positions: model type {config.model_type!r} has a learned position table of "
                 f"{max_positions(config)} entries that cannot be extended")
        config.max_position_embeddings = args.max_positions
    if len(tokenizer) > config.vocab_size:
        fail(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {config.vocab_size}")
    return config


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(args, config, device, dtype):
    """Random weights for built-in configs (the same on every process: seeded), else from_pretrained."""
    from transformers import AutoModelForCausalLM

    if args.model in BUILTIN_MODELS:
        set_seed(args.seed)
        with torch.device(device):  # initialise on the device: a 1B model is slow to fill on the CPU
            model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn[0])
        model = model.to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, config=config, dtype=dtype,
                                                     attn_implementation=args.attn[0]).to(device)
    return model.eval()


def check_implementations(model, names: list[str]):
    """The model must accept every implementation (e.g. flash_attention_2 needs its package)."""
    for name in names:
        try:
            model.set_attn_implementation(name)
        except Exception as err:
            fail(f"--attn {name}: the model does not accept it ({type(err).__name__}: {err})")


# --------------------------------------------------------------------------- results file


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


def share(records: list) -> list:
    """Every process's records, concatenated in process order, on every process.

    Each process then updates its copy of the results identically, so decisions taken from
    them (what to skip next) agree and no process waits forever in a collective.
    """
    return gather_object(records)


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA's OutOfMemoryError, and the RuntimeErrors of the CPU allocator and cuBLAS that mean the same."""
    text = str(err).lower()
    return isinstance(err, torch.OutOfMemoryError) or any(
        s in text for s in ("out of memory", "can't allocate memory", "cublas_status_alloc_failed"))


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def skip_reason(done: dict, length: int, max_seconds: float | None) -> str | None:
    """Why ``length`` need not be tried, given this implementation's results at shorter lengths.

    After an out-of-memory error, longer lengths would fail too. With a time budget, the next
    time is extrapolated from the last two lengths as t ~ length^e, e clamped to [1, 2]
    (attention costs grow at least linearly and at most quadratically; one point: e = 1).
    """
    shorter = sorted((int(n), r) for n, r in done.items() if int(n) < length and "skipped" not in r)
    if any(r.get("out_of_memory") for _, r in shorter):
        return f"out of memory at {min(n for n, r in shorter if r.get('out_of_memory'))} tokens"
    timed = [(n, r["seconds"]) for n, r in shorter if "seconds" in r]
    if max_seconds is None or not timed:
        return None
    (n1, t1), (n0, t0) = timed[-1], timed[-2] if len(timed) > 1 else (None, None)
    exponent = 1.0 if n0 is None or t0 <= 0 else min(2.0, max(1.0, math.log(t1 / t0) / math.log(n1 / n0)))
    predicted = t1 * (length / n1) ** exponent
    if predicted > max_seconds:
        return f"predicted {predicted:.0f} s > --max_seconds_per_point {max_seconds:g}"
    return None


# --------------------------------------------------------------------------- perplexity


def long_documents(args, tokenizer) -> torch.Tensor:
    """Up to --ppl_documents documents of --document_tokens tokens: the split's documents joined
    by eos into one stream (cached on disk) and cut. (n_documents, document_tokens) int64"""
    try:
        splits = data.load_text_dataset(args.dataset, args.text_column, max_files=args.max_files,
                                        config_name=args.dataset_config)
    except (FileNotFoundError, ValueError, ImportError) as err:
        fail(str(err))
    texts = getattr(splits, args.split)
    key = f"{splits.fingerprint()}-{data.tokenizer_fingerprint(tokenizer)}-{args.split}"
    stream = data.cached_token_stream(texts, tokenizer, key, args.cache_dir)
    documents = data.pack_into_blocks(stream, args.document_tokens)[: args.ppl_documents]
    if len(documents) == 0:
        fail(f"the {args.split} split of {splits.name!r} has {len(stream)} tokens, fewer than one document of "
             f"{args.document_tokens} (--document_tokens, by default the longest length)")
    return documents


@torch.inference_mode()
def window_nll(model, input_ids: torch.Tensor, n_scored: int, chunk: int = 4096) -> float:
    """Sum of -log p(token | earlier tokens of the window) over the window's last ``n_scored`` tokens.

    input_ids (1, N). The logits are formed ``chunk`` positions at a time from the final hidden
    states (logits = output embedding of the last hidden state, as in the Llama family and GPT-2):
    at 256k tokens and a 128k vocabulary, all logits at once would take 128 GiB in fp32.
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    hidden = hidden[:, -n_scored - 1:-1]  # position t predicts token t + 1
    targets = input_ids[:, -n_scored:]
    head = model.get_output_embeddings()
    total = 0.0
    for start in range(0, n_scored, chunk):
        logits = head(hidden[:, start:start + chunk]).float()
        total += F.cross_entropy(logits.flatten(0, 1), targets[:, start:start + chunk].flatten(), reduction="sum").item()
    return total


def sliding_window_nll(model, document: torch.Tensor, length: int, stride: int) -> tuple[float, int, int]:
    """Windows of ``length`` tokens every ``stride`` tokens over ``document`` (N,): each scores only
    the tokens no earlier window scored, so every token but the first is scored once, with at
    least length - stride tokens of context (all earlier tokens in the first window).

    Returns (sum of negative log-likelihoods, tokens scored, windows).
    """
    n = document.numel()
    nll, scored, windows, done = 0.0, 0, 0, 1  # the first token has nothing to be predicted from
    for begin in range(0, n, stride):
        end = min(begin + length, n)
        if end <= done:
            break
        window = document[begin:end].unsqueeze(0).to(model.device)
        nll += window_nll(model, window, end - done)
        scored, windows, done = scored + end - done, windows + 1, end
        if end == n:
            break
    return nll, scored, windows


def perplexity_point(model, documents: torch.Tensor, length: int, stride: int, accelerator) -> dict:
    """Perplexity at one length: this process takes every num_processes-th document; all gathered."""
    started = time.perf_counter()
    mine = range(accelerator.process_index, len(documents), accelerator.num_processes)
    record = {"nll": 0.0, "tokens": 0, "windows": 0, "documents": 0, "out_of_memory": False}
    try:
        for i in mine:
            nll, tokens, windows = sliding_window_nll(model, documents[i], length, stride)
            record["nll"] += nll
            record["tokens"] += tokens
            record["windows"] += windows
            record["documents"] += 1
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        record["out_of_memory"] = True
    if record["out_of_memory"]:  # outside the except block: its traceback no longer holds the tensors
        free_memory(model.device)
    record["seconds"] = time.perf_counter() - started
    parts = share([record])
    if any(p["out_of_memory"] for p in parts):
        return {"out_of_memory": True, "seconds": max(p["seconds"] for p in parts)}
    nll, tokens = sum(p["nll"] for p in parts), sum(p["tokens"] for p in parts)
    return {"perplexity": math.exp(min(nll / tokens, 50.0)), "nll_per_token": nll / tokens, "tokens": tokens,
            "documents": sum(p["documents"] for p in parts), "windows": sum(p["windows"] for p in parts),
            "stride": stride, "seconds": max(p["seconds"] for p in parts)}


# --------------------------------------------------------------------------- passkey


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

    task, filler, question = encode(PASSKEY_TASK, first=True), encode(PASSKEY_FILLER), encode(PASSKEY_QUESTION)
    needle = encode(PASSKEY_NEEDLE.format(key=key))
    repeats = (length - len(task) - len(needle) - len(question)) // len(filler)
    if repeats < 1:
        raise ValueError(f"a passkey prompt needs more than {length} tokens with this tokenizer "
                         f"(task, needle and question take {len(task) + len(needle) + len(question)}, "
                         f"one filler sentence group {len(filler)})")
    before = round(depth * repeats)
    ids = task + filler * before + needle + filler * (repeats - before) + question
    text = (PASSKEY_TASK + PASSKEY_FILLER * before + PASSKEY_NEEDLE.format(key=key)
            + PASSKEY_FILLER * (repeats - before) + PASSKEY_QUESTION)
    return PasskeyPrompt(ids, text, key, depth, len(task) + len(filler) * before)


def passkey(seed: int, length: int, depth: float, trial: int) -> str:
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
                             do_sample=False, num_beams=1, pad_token_id=pad)
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
            records.append(dict(passkey_trial(generate, tokenizer, length, depth, passkey(seed, length, depth, trial)),
                                trial=trial))
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        out_of_memory = True
    seconds = time.perf_counter() - started
    parts = share([{"records": records, "out_of_memory": out_of_memory, "seconds": seconds}]) if accelerator else \
        [{"records": records, "out_of_memory": out_of_memory, "seconds": seconds}]
    seconds = max(p["seconds"] for p in parts)
    if any(p["out_of_memory"] for p in parts):
        return {"out_of_memory": True, "seconds": seconds}
    records = sorted((r for p in parts for r in p["records"]), key=lambda r: r["trial"])
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "trials": len(records),
            "prompt_tokens": records[0]["prompt_tokens"], "seconds": seconds, "samples": records}


# --------------------------------------------------------------------------- cost


class StepClock(LogitsProcessor):
    """generate() calls its logits processors once per forward pass: a time mark after each.

    On CUDA the marks are events recorded on the stream (no synchronisation per step); on the
    CPU, wall-clock times.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.mark()
        return scores

    def seconds(self) -> list[float]:
        """Seconds from the first mark to each mark."""
        if self.cuda:
            torch.cuda.synchronize()
            return [self.marks[0].elapsed_time(m) / 1e3 for m in self.marks]
        return [m - self.marks[0] for m in self.marks]


def resident_bytes() -> int | None:
    """The process's resident set size (Linux), or None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Peak memory above the level at entry, in bytes (None if it cannot be measured).

    CUDA: torch.cuda.max_memory_allocated. CPU: the resident set size sampled every 2 ms by a
    thread; tracemalloc cannot see torch's CPU allocations, and memory the allocator kept from
    earlier work is not counted again, so CPU numbers are indicative.
    """

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.peak = resident_bytes()
            self.running = self.base is not None
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, resident_bytes() or 0)
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.base
        else:
            self.running = False
            self.thread.join()
            if self.base is not None:
                self.bytes = max(self.peak, resident_bytes() or 0) - self.base
        return False


def cache_bytes(cache) -> int | None:
    """Bytes held by generate()'s cache: the recurrent state or the keys and values."""
    if isinstance(cache, fastmax_hf.FastmaxCache):
        return cache.nbytes()
    layers = getattr(cache, "layers", None)
    if layers is None:
        return None
    tensors = [getattr(layer, name, None) for layer in layers for name in ("keys", "values")]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def summarize_ms(seconds: list[float]) -> dict:
    ms = sorted(s * 1e3 for s in seconds)
    return {"median": statistics.median(ms), "mean": statistics.fmean(ms),
            "p90": ms[min(len(ms) - 1, math.ceil(0.9 * len(ms)) - 1)], "min": ms[0], "max": ms[-1]}


def timed_generate(model, ids: torch.Tensor, decode_tokens: int) -> tuple[list[float], object]:
    """Greedy generate() of ``decode_tokens`` tokens: (seconds from the call to each forward
    pass's logits, one per pass, then to the call's end; generate()'s output)."""
    clock = StepClock(model.device)
    clock.mark()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=decode_tokens,
                         min_new_tokens=decode_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                         logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True)
    clock.mark()
    return clock.seconds(), out


def step_costs(marks: list[float], prefix: str = "") -> dict:
    steps = marks[1:-1]  # after the start mark, one per forward pass; the last mark ends the call
    return {f"prefill_s{prefix}": steps[0],
            f"decode_ms_per_token{prefix}": summarize_ms([b - a for a, b in zip(steps, steps[1:])]) if len(steps) > 1 else None}


@torch.inference_mode()
def measure_cost(model, length: int, decode_tokens: int, seed: int, repeat: bool = False) -> dict:
    """Greedy generate() of ``decode_tokens`` tokens after a prompt of ``length`` random tokens.

    prefill_s: from the call to the first logits (the prompt's forward pass); decode: the time
    between consecutive logits, one per generated token after the first.

    With ``repeat`` the same call runs a second time (``..._repeat`` keys). The two differ where
    an attention backend sets itself up per sequence length: with torch 2.11 on an H100, SDPA
    runs cuDNN attention, which builds an execution plan for every new key length, and every
    decoding step has a new one. The first call is what generating new text costs in a process
    that has not seen those lengths; the second is the kernels alone.
    """
    device = model.device
    g = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(device)
    free_memory(device)
    with PeakMemory(device) as memory:
        marks, out = timed_generate(model, ids, decode_tokens)
    cache = getattr(out, "cache", None)  # transformers >= 5.24; 5.17 calls it past_key_values
    cache = cache if cache is not None else getattr(out, "past_key_values", None)
    record = {
        **step_costs(marks),
        "generated_tokens": int(out.sequences.shape[1] - length),
        "peak_memory_bytes": memory.bytes,
        "cache_class": type(cache).__name__,
        "cache_bytes": cache_bytes(cache),
        "seconds": marks[-1],
    }
    record["prefill_tokens_per_s"] = length / record["prefill_s"]
    del out, cache
    if repeat:
        marks, out = timed_generate(model, ids, decode_tokens)
        record.update(step_costs(marks, "_repeat"))
        record["seconds"] += marks[-1]
        del out
    return record


def cost_point(model, length: int, args) -> dict:
    """One measurement, an out-of-memory error recorded as such."""
    try:
        return measure_cost(model, length, args.decode_tokens, args.seed, repeat=not args.no_repeat)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
        record = {"out_of_memory": True, "error": str(err).splitlines()[0][:300]}
    free_memory(model.device)  # outside the except block: its traceback no longer holds the tensors
    return record


def warm_up(model, length: int, seed: int):
    """One untimed generate() at the first length: kernels compiled (Triton's are compiled per
    shape regime on first use), cuBLAS and the allocator primed. Running out of memory here is
    left for the measurement to record."""
    try:
        measure_cost(model, length, 2, seed)
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_out_of_memory(err):
            raise
    free_memory(model.device)


# --------------------------------------------------------------------------- sections


def run_perplexity(model, documents, args, results, save, accelerator):
    for name in args.attn:
        model.set_attn_implementation(name)
        done = results["perplexity"].setdefault(name, {})
        bar = tqdm(args.lengths, desc=f"perplexity/{name}", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for length in bar:
            if str(length) in done and "skipped" not in done[str(length)]:
                continue  # measured (or out of memory) in an earlier run
            reason = skip_reason(done, length, args.max_seconds_per_point)
            if reason:
                done[str(length)] = {"skipped": reason}
            else:
                stride = min(args.stride or max(1, length // 2), length)
                done[str(length)] = perplexity_point(model, documents, length, stride, accelerator)
            bar.set_postfix(length=length, ppl=f"{done[str(length)].get('perplexity', float('nan')):.3g}")
            save()


def passkey_lengths_summary(done: dict) -> dict:
    """One entry per length measured so far, for ``skip_reason``: a length is skipped (or not) as a
    whole, judged by its slowest cell and whether any cell ran out of memory."""
    summary = {}
    for length, row in done.items():
        cells = [cell for cell in row.values() if "skipped" not in cell]
        if cells:
            summary[length] = {"out_of_memory": any(c.get("out_of_memory") for c in cells),
                               "seconds": max(c.get("seconds", 0.0) for c in cells)}
    return summary


def run_passkey(model, tokenizer, args, results, save, accelerator):
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
            reason = skip_reason(passkey_lengths_summary(done), length, args.max_seconds_per_point)
            if reason:
                row[f"{depth:g}"] = {"skipped": reason}
            else:
                row[f"{depth:g}"] = passkey_cell(generate, tokenizer, length, depth, args.trials, args.seed, accelerator)
                if row[f"{depth:g}"].get("out_of_memory"):
                    free_memory(model.device)
            bar.set_postfix(length=length, depth=depth, acc=row[f"{depth:g}"].get("accuracy"))
            save()


def run_cost(model, args, results, save, accelerator):
    """Measured on the main process only (one timing per point); the others receive its records."""
    for name in args.attn:
        model.set_attn_implementation(name)
        done = results["cost"].setdefault(name, {})
        pending = [n for n in args.lengths if str(n) not in done or "skipped" in done[str(n)]]
        if pending and accelerator.is_main_process:
            warm_up(model, pending[0], args.seed)
        bar = tqdm(pending, desc=f"cost/{name}", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for length in bar:
            reason = skip_reason(done, length, args.max_seconds_per_point)
            record = [{"skipped": reason} if reason else cost_point(model, length, args)] \
                if accelerator.is_main_process else []
            done[str(length)] = share(record)[0]
            bar.set_postfix(length=length, prefill_s=done[str(length)].get("prefill_s"))
            save()


# --------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _tick(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def _length_axis(ax, lengths):
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([_tick(n) for n in lengths], rotation=45)
    ax.set_xlabel("context length (tokens)")


def _not_measured(entry: dict) -> str:
    return "OOM" if entry.get("out_of_memory") else "skipped"


def plot_perplexity(results: dict, path: Path, title: str):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lengths = set()
    for name, points in results["perplexity"].items():
        measured = sorted((int(n), r["perplexity"]) for n, r in points.items() if "perplexity" in r)
        failed = sorted(f"{int(n)}: {_not_measured(r)}" for n, r in points.items() if "perplexity" not in r)
        lengths |= {int(n) for n in points}
        if measured:
            ax.plot(*zip(*measured), "o-", label=name + (f" ({', '.join(failed)})" if failed else ""))
    _length_axis(ax, sorted(lengths))
    ax.set_yscale("log")
    ax.set_ylabel("perplexity (sliding window)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_passkey(grid: dict, path: Path, title: str):
    """Accuracy by depth (rows) and length (columns); cells not measured are gray and labelled."""
    plt = _pyplot()
    lengths = sorted(int(n) for n in grid)
    depths = sorted({float(d) for row in grid.values() for d in row})
    accuracy = torch.full((len(depths), len(lengths)), float("nan"))
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.5 + 0.45 * len(depths)))
    for j, n in enumerate(lengths):
        for i, d in enumerate(depths):
            entry = grid[str(n)].get(f"{d:g}")
            if entry is None:
                continue
            if "accuracy" in entry:
                accuracy[i, j] = entry["accuracy"]
                ax.text(j, i, f"{entry['accuracy']:.2f}", ha="center", va="center", fontsize=8)
            else:
                ax.text(j, i, _not_measured(entry), ha="center", va="center", fontsize=7, color="dimgray")
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="lightgray")
    image = ax.imshow(accuracy.numpy(), cmap=cmap, vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(lengths)))
    ax.set_xticklabels([_tick(n) for n in lengths])
    ax.set_yticks(range(len(depths)))
    ax.set_yticklabels([f"{d:g}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("depth of the key")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cost(results: dict, path: Path, title: str):
    """Prefill time, median decode latency and peak memory by length; OOM lengths marked x."""
    plt = _pyplot()
    panels = [("prefill time (s)", lambda r: r["prefill_s"]),
              ("decode latency (ms / token, median)", lambda r: (r["decode_ms_per_token"] or {}).get("median")),
              ("peak memory above weights (GiB)", lambda r: r["peak_memory_bytes"] / 2**30
               if r.get("peak_memory_bytes") is not None else None)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    lengths = sorted({int(n) for points in results["cost"].values() for n in points})
    for ax, (label, value) in zip(axes, panels):
        for k, (name, points) in enumerate(results["cost"].items()):
            measured = sorted((int(n), value(r)) for n, r in points.items() if "prefill_s" in r and value(r) is not None)
            skipped = sorted(int(n) for n, r in points.items() if "skipped" in r)
            legend = name + (f" (skipped from {_tick(skipped[0])})" if skipped else "")
            line = ax.plot(*zip(*measured), "o-", label=legend)[0] if measured else None
            oom = [int(n) for n, r in points.items() if r.get("out_of_memory")]
            if oom:
                color = line.get_color() if line else f"C{k}"
                ax.plot(oom, [measured[-1][1] if measured else 1.0] * len(oom), "x", ms=10, mew=2, color=color,
                        label=f"{name}: out of memory")
        if label.startswith("decode"):  # the repeated call (measure_cost), dashed in the same colour
            for k, (name, points) in enumerate(results["cost"].items()):
                repeat = sorted((int(n), r["decode_ms_per_token_repeat"]["median"]) for n, r in points.items()
                                if (r.get("decode_ms_per_token_repeat") or {}).get("median") is not None)
                if repeat:
                    ax.plot(*zip(*repeat), "s--", color=f"C{k}", mfc="none", label=f"{name}, same call repeated")
        if lengths:
            _length_axis(ax, lengths)
        ax.set_yscale("log")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(results: dict, out: Path, title: str):
    if any(results["perplexity"].values()):
        plot_perplexity(results, out / "perplexity.png", title)
    for name, grid in results["passkey"].items():
        if grid:
            plot_passkey(grid, out / f"passkey_{name}.png", f"passkey retrieval, {name}\n{title}")
    if any(results["cost"].values()):
        plot_cost(results, out / "cost.png", title)


# --------------------------------------------------------------------------- main


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


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    accelerator = Accelerator()
    device = accelerator.device
    dtype = resolve_dtype(args.dtype, device)
    out = Path(args.output_dir)
    results_path = out / "results.json"

    # ---- everything that can be wrong is checked before the first measurement
    results = load_results(results_path, settings(args, device, dtype), args.sections)
    tokenizer = load_tokenizer(args, accelerator)
    config = model_config(args, tokenizer)
    check_positions(args, config)
    if "passkey" in args.sections:
        check_passkey_lengths(args, tokenizer)
    documents = None
    if "perplexity" in args.sections:
        with accelerator.main_process_first():  # the token cache is built once
            documents = long_documents(args, tokenizer)
    model = load_model(args, config, device, dtype)
    check_implementations(model, args.attn)
    if args.model in BUILTIN_MODELS and ("perplexity" in args.sections or "passkey" in args.sections):
        accelerator.print(f"note: --model {args.model} is a built-in config with random weights; "
                          "perplexity and passkey then only exercise the pipeline", file=sys.stderr)

    results["meta"] = describe(model, args, accelerator, dtype)
    title = f"{args.model} ({results['meta']['parameters'] / 1e6:.3g}M params, {results['meta']['dtype']}) " \
            f"on {results['meta']['device']}"
    accelerator.print(f"{title}; {accelerator.num_processes} process(es); attention {args.attn}; "
                      f"lengths {args.lengths}; sections {args.sections}; output {out}")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)

    def save():  # after every measurement: an interrupted run keeps what it measured
        if accelerator.is_main_process:
            save_results(results, results_path)

    save()
    for section in args.sections:
        if section == "perplexity":
            accelerator.print(f"perplexity: {len(documents)} document(s) of {documents.shape[1]} tokens "
                              f"from {args.dataset} ({args.split})")
            run_perplexity(model, documents, args, results, save, accelerator)
        elif section == "passkey":
            run_passkey(model, tokenizer, args, results, save, accelerator)
        else:
            run_cost(model, args, results, save, accelerator)
        if accelerator.is_main_process:
            write_plots(results, out, title)
    accelerator.wait_for_everyone()
    accelerator.print(f"wrote {results_path} and plots in {out}")
    return results


if __name__ == "__main__":
    # long prefills allocate MLP activations of many GiB: without expandable segments a 1M-token
    # prompt on a 1B model failed with 16 GiB reserved but unallocated (fragmentation)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
