"""Train language models with Fastmax attention, or convert softmax models to it.

    python scripts/finetune.py                                   # 5M-param Llama, fastmax, stdlib corpus: ~2 min on a CPU
    python scripts/finetune.py --mode scratch --attention sdpa   # the softmax baseline / teacher
    python scripts/finetune.py --mode swap --model_name_or_path runs/teacher   # softmax weights, switched, fine-tuned
    python scripts/finetune.py --mode distill --model_name_or_path runs/teacher --lora_rank 16
    python scripts/finetune.py --mode distill --gguf_file /tmp/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # a GGUF model
    accelerate launch --config_file scripts/accelerate_ddp.yaml scripts/finetune.py ...   # DDP (FSDP: accelerate_fsdp.yaml)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 scripts/finetune.py   # 2 CPU processes (gloo)
    python scripts/finetune.py --train_file notes.jsonl          # your own text (read with `datasets`)
    python scripts/finetune.py --resume_from_checkpoint latest --max_train_steps 400   # extend a finished run

The options follow transformers' run_clm_no_trainer.py (--model_name_or_path, --dataset_name,
--train_file, --per_device_train_batch_size, --learning_rate, --max_train_steps, ...); the names
this script had before (--model, --dataset, --batch_size, --lr, --max_steps, ...) still work.
`--help` lists them all with their defaults.

Modes:
  scratch  random initialisation, trained with --attention (fastmax unless told sdpa).
  swap     a softmax model's weights, attention switched to fastmax, fine-tuned.
  distill  the conversion recipe (LoLCATs-style). Stage 1, the first --distill_steps steps:
           attention transfer: every layer's fastmax output is fitted (MSE) to the softmax
           output of the original model on the same hidden states (teacher forcing);
           only q/k-side parameters train: LoRA on q_proj/k_proj (--distill_lora_rank)
           and a per-head, per-RoPE-frequency query gain (fastmax_hf.distill.QueryGain).
           Both merge into q_proj/k_proj; stage 2 fine-tunes with fastmax (full or LoRA) on
           the KL from the softmax model's next-token distributions (--kd_weight 1, the
           default; below 1 it is mixed with the data's cross-entropy).
  swap and distill spend the same --max_train_steps, so their token budgets are equal.
  --window W (with fastmax attention, any mode) stores the hybrid window in the fastmax config:
           exact softmax over the last W positions, fastmax over the earlier ones.

Outputs in --output_dir: the final model and tokenizer (save_pretrained; reload with
from_pretrained(dir, attn_implementation="fastmax")), log.csv, tensorboard/, loss.png,
results.json, checkpoints/step_XXXXXX/ (accelerator state + trainer_state.json; each written
into checkpoints/incomplete-step_XXXXXX/ and renamed into place when complete). The data order
and the learning rate are functions of the step, so a resumed run reads the batches and takes the
steps the uninterrupted one would have; resuming with a larger --max_train_steps extends a run
(finished or not), its later steps on the schedule of the longer run.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

import fastmax_hf
from fastmax_hf import data, distill
from fastmax_hf.integration.window_gain import PARAMETER as WINDOW_GAIN_PARAMETER

# What this script shares with scripts/eval_long_context.py is in script_common.py beside it.
# `python scripts/finetune.py` and `accelerate launch` put this folder on sys.path; runpy and
# importlib (the tests) do not.
SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:
    sys.path.insert(0, SCRIPTS)

import script_common  # noqa: E402
from script_common import check_vocabulary, fail, max_positions  # noqa: E402

import gguf_model  # noqa: E402

MODES = ("scratch", "swap", "distill")
# --report_to: trackers accelerate knows (each the name of its package), "all" of those installed, or none
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "aim", "dvclive", "all", "none")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every option's default after its help; an option whose
    default is worked out later (None) says in its help what it will be."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The command line. Names follow transformers' run_clm_no_trainer.py; the names this script had
    before are aliases (several option strings, one dest; the dests are the old, shorter names)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--mode", choices=MODES, default="scratch", help="what to train (see Modes above)")
    # model and tokenizer
    p.add_argument("--model_name_or_path", "--model", dest="model", default=data.DEFAULT_MODEL,
                   help=f"a built-in config {sorted(data.BUILTIN_MODELS)}, a hub id or a local model directory")
    p.add_argument("--gguf_file", default=None,
                   help="instead of --model_name_or_path: a GGUF file (llama.cpp's format; needs the `gguf` package) "
                        "holding the pretrained softmax model, dequantized to float32, and its tokenizer (the default "
                        "--tokenizer_name); default: none")
    p.add_argument("--attention", choices=("fastmax", "sdpa"), default="fastmax",
                   help="scratch only: sdpa trains the softmax baseline (e.g. a teacher to convert later)")
    p.add_argument("--tokenizer_name", "--tokenizer", dest="tokenizer", default=None,
                   help="'default' (BPE trained on the stdlib corpus), a hub id or path; default: the model's own, "
                        "or 'default' for built-in models")
    p.add_argument("--vocab_size", type=int, default=data.DEFAULT_VOCAB_SIZE, help="of the default tokenizer")
    p.add_argument("--cache_dir", default=None,
                   help="tokenizer / token cache; default: $FASTMAX_HF_CACHE, else ~/.cache/fastmax_hf")
    # data
    p.add_argument("--dataset_name", "--dataset", dest="dataset", default=data.DEFAULT,
                   help="'default' (the stdlib corpus, without the held-out texts of fastmax_hf.data), 'docstrings' "
                        "(the docstrings of the installed transformers, torch, numpy and accelerate: English prose), "
                        "both joined ('default+docstrings'), a `datasets` hub name, or local files (read with `datasets`)")
    p.add_argument("--dataset_config_name", "--dataset_config", dest="dataset_config", default=None,
                   help="the hub dataset's configuration name; default: none")
    p.add_argument("--train_file", default=None,
                   help="instead of --dataset_name: local text / json / jsonl / parquet / csv file(s) (comma-separated, "
                        "or a folder), read with `datasets`; default: none")
    p.add_argument("--text_column", default="text", help="the column of --dataset_name / --train_file holding the text")
    p.add_argument("--validation_split_percentage", "--validation_percent", dest="validation_percent", type=float,
                   default=data.DEFAULT_VALIDATION_PERCENT,
                   help="percent of the documents (by file for the stdlib corpus) held out for validation, where "
                        "the data have no validation split")
    p.add_argument("--max_files", type=int, default=None, help="default corpus: only its first N files; default: all")
    p.add_argument("--output_dir", default="runs/finetune", help="where the model, logs and checkpoints go")
    # optimisation
    p.add_argument("--block_size", "--seq_len", dest="seq_len", type=int, default=256, help="tokens per training block")
    p.add_argument("--per_device_train_batch_size", "--batch_size", dest="batch_size", type=int, default=8,
                   help="blocks per device per micro-step")
    p.add_argument("--gradient_accumulation_steps", "--grad_accum", dest="grad_accum", type=int, default=1,
                   help="micro-steps per optimizer step")
    p.add_argument("--max_train_steps", "--max_steps", dest="max_steps", type=int, default=200,
                   help="optimizer steps in total (all stages); raise it when resuming to extend a run")
    p.add_argument("--learning_rate", "--lr", dest="lr", type=float, default=None,
                   help="peak LR; default 1e-3 for scratch or LoRA, else 3e-4")
    p.add_argument("--min_lr_ratio", type=float, default=0.1, help="cosine decays to learning_rate * this")
    p.add_argument("--num_warmup_steps", "--warmup_steps", dest="warmup_steps", type=int, default=None,
                   help="linear warmup steps of each stage; default: 5%% of a stage's steps")
    p.add_argument("--weight_decay", type=float, default=0.1, help="AdamW's, on matrices only")
    p.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping (0: none)")
    p.add_argument("--lora_rank", type=int, default=0, help="fine-tune with LoRA adapters of this rank; 0 = full")
    p.add_argument("--distill_steps", type=int, default=None,
                   help="distill: attention-transfer steps; default: max_train_steps // 4 (on resume: the checkpoint's)")
    p.add_argument("--distill_lr", type=float, default=1e-2, help="distill: peak LR of the query gains and q/k LoRA")
    p.add_argument("--distill_lora_rank", type=int, default=8,
                   help="distill: LoRA rank on q/k in attention transfer (0: gains only)")
    p.add_argument("--kd_weight", type=float, default=None,
                   help="swap/distill fine-tuning: loss = (1-w) CE + w KL(softmax teacher || model); default 1 "
                        "for distill of a pretrained model, else 0 (swap: the plain swap-and-finetune baseline)")
    p.add_argument("--mixed_precision", choices=("no", "bf16", "fp16"), default=None,
                   help="default: bf16 on CUDA, no on CPU (or what `accelerate launch` was told)")
    p.add_argument("--gradient_checkpointing", action="store_true", help="recompute each layer in backward")
    p.add_argument("--seed", type=int, default=0, help="of the initialisation and of the data order")
    # fastmax options, stored in the saved config
    p.add_argument("--fastmax_p", type=int, default=2, choices=(1, 2), help="order of the polynomial f (1 or 2)")
    p.add_argument("--fastmax_a0", type=float, default=1.0, help="f(s) = a0 + a1 s + a2 s^2: a0")
    p.add_argument("--fastmax_a1", type=float, default=1.0, help="f(s): a1")
    p.add_argument("--fastmax_a2", type=float, default=0.5, help="f(s): a2 (p = 2)")
    p.add_argument("--fastmax_temperature", type=float, default=1.0, help="s = q.k * the model's scaling / temperature")
    p.add_argument("--fastmax_normalize", action="store_true", help="scale q and k by lim / max ||x|| first, so |s| <= lim^2 * scale")
    p.add_argument("--fastmax_lim", type=float, default=1.0, help="with --fastmax_normalize: the norm q and k are scaled to")
    p.add_argument("--window", type=int, default=None,
                   help="hybrid window: exact softmax over the last W positions, fastmax over the earlier ones "
                        "(stored in the fastmax config; on the Triton kernels on a GPU); default: none")
    p.add_argument("--window_gain", type=float, default=1.0, help="with --window: the weight of the fastmax part")
    p.add_argument("--learn_window_gain", action="store_true",
                   help="with --window: learn one gain per query head and layer while fine-tuning (log-parametrised; "
                        "saved in config.json's fastmax options; fastmax_hf.integration.learn_window_gains)")
    p.add_argument("--window_gain_lr", type=float, default=1e-2, help="with --learn_window_gain: the gains' peak LR")
    # evaluation, checkpoints, logging
    p.add_argument("--eval_every", type=int, default=50, help="evaluate every N steps (and at each stage's end)")
    p.add_argument("--eval_blocks", type=int, default=64, help="validation blocks per evaluation (all processes)")
    p.add_argument("--checkpointing_steps", "--save_every", dest="save_every", type=int, default=100,
                   help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--resume_from_checkpoint", default=None,
                   help="a checkpoint directory, or 'latest': the newest complete one in --output_dir; with a "
                        "larger --max_train_steps a finished run goes on; default: none")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="stop (checkpointed) at this step as if interrupted; the schedule still follows "
                        "--max_train_steps; default: none")
    p.add_argument("--with_tracking", action="store_true",
                   help="require the --report_to tracker: an error where its package is missing (without it, "
                        "the tracker logs where its package is installed and is skipped otherwise)")
    p.add_argument("--report_to", default="tensorboard", choices=TRACKERS,
                   help="the tracker accelerate logs the metrics to ('none': only log.csv)")
    return p


def parse_args(argv=None):
    """The arguments, with the defaults that depend on other arguments filled in."""
    args = build_parser().parse_args(argv)
    if args.gguf_file is not None:
        if args.model != data.DEFAULT_MODEL:
            fail(f"--gguf_file and --model_name_or_path both name the model to convert "
                 f"(--model_name_or_path {args.model}): give one of them")
        args.model = args.gguf_file  # a pretrained model, for every check below (not a built-in config)
    if args.train_file is not None and args.dataset != data.DEFAULT:
        fail(f"--train_file and --dataset_name both name the training data (--dataset_name {args.dataset}): "
             "give one of them")
    if args.lr is None:
        args.lr = 1e-3 if args.mode == "scratch" or args.lora_rank > 0 else 3e-4
    args.distill_steps_given = args.distill_steps is not None  # a resumed run keeps its checkpoint's default
    if args.mode == "distill" and args.distill_steps is None:
        args.distill_steps = args.max_steps // 4
    if args.kd_weight is None:
        args.kd_weight = 1.0 if args.mode == "distill" and args.model not in data.BUILTIN_MODELS else 0.0
    return args


# --------------------------------------------------------------------------- checks before training


def check_args(args):
    if args.mode != "scratch" and args.attention != "fastmax":
        fail(f"--attention {args.attention} only applies to --mode scratch; {args.mode} always ends in fastmax")
    if args.max_steps < 1 or args.batch_size < 1 or args.grad_accum < 1:
        fail("--max_train_steps, --per_device_train_batch_size and --gradient_accumulation_steps must be positive")
    if args.mode == "distill" and not 0 < args.distill_steps < args.max_steps:
        fail(f"--distill_steps must lie in (0, --max_train_steps={args.max_steps}), got {args.distill_steps}")
    if args.kd_weight > 0 and (args.mode == "scratch" or args.model in data.BUILTIN_MODELS):
        fail("--kd_weight needs a pretrained softmax --model_name_or_path to learn from (swap or distill)")
    if not 0 <= args.kd_weight <= 1:
        fail(f"--kd_weight must lie in [0, 1], got {args.kd_weight}")
    if args.window is not None and args.window < 1:
        fail(f"--window must be a positive number of positions, got {args.window}")
    if not args.window_gain > 0:
        fail(f"--window_gain must be positive, got {args.window_gain}")
    if args.learn_window_gain and args.window is None:
        fail("--learn_window_gain needs --window: the gains weigh the hybrid window's fastmax part")
    if args.learn_window_gain and not args.window_gain_lr > 0:
        fail(f"--window_gain_lr must be positive, got {args.window_gain_lr}")
    if args.dataset in data.HELD_OUT_CORPORA and args.train_file is None:
        fail(f"--dataset_name {args.dataset} is held out for evaluation (scripts/eval_long_context.py --dataset "
             f"{args.dataset}); it is never trained on: train on 'default' or your own data")
    if args.stop_at_step is not None and not 0 < args.stop_at_step <= args.max_steps:
        fail(f"--stop_at_step must lie in (0, --max_train_steps], got {args.stop_at_step}")


def load_model_config(args):
    """The config of a hub id / local path --model_name_or_path or of --gguf_file (built-in ones are
    made from the tokenizer)."""
    if args.gguf_file is not None:
        try:
            return gguf_model.load_gguf_config(args.gguf_file)
        except (ValueError, ImportError) as err:
            fail(str(err))
    return script_common.load_pretrained_config(args.model, data.BUILTIN_MODELS, "--model_name_or_path")


def check_model_config(args, config, vocab_size: int):
    """Fail early on a sequence the model cannot position, a tokenizer larger than its
    embedding, or a model family fastmax cannot patch."""
    limit = max_positions(config)
    if limit is not None and args.seq_len > limit:
        fail(f"--block_size {args.seq_len} exceeds the model's {limit} positions")
    check_vocabulary(config, vocab_size)
    families = fastmax_hf.integration.FAMILIES  # the model types whose attention fastmax_hf patches
    if args.attention == "fastmax" and config.model_type not in families:
        fail(f"fastmax cannot convert model type {config.model_type!r}; supported: {sorted(families)}")


# --------------------------------------------------------------------------- data


def load_tokenizer(args, accelerator):
    """--tokenizer, else the model's own (--gguf_file: the one it embeds), else (built-in models) the
    default BPE, trained once."""
    return script_common.load_tokenizer(args, accelerator, builtin=args.model in data.BUILTIN_MODELS)


def load_blocks(args, tokenizer, accelerator) -> dict[str, torch.Tensor]:
    """Packed blocks {"train": (N, seq_len), "validation": (M, seq_len)} (token caches built once).

    --train_file and a --dataset_name other than 'default' are read with `datasets`, imported only then.
    """
    with accelerator.main_process_first():
        try:
            if args.train_file is not None:
                splits = data.load_datasets_source(args.train_file, args.text_column, args.validation_percent,
                                                   argument="--train_file", local=True)
            else:
                splits = data.load_text_dataset(args.dataset, args.text_column, args.validation_percent,
                                                args.max_files, args.dataset_config, argument="--dataset_name")
            return data.token_blocks(splits, tokenizer, args.seq_len, args.cache_dir)
        except (FileNotFoundError, ValueError, ImportError) as err:
            fail(str(err))


def block_indices(n_blocks: int, start: int, count: int, seed: int) -> torch.Tensor:
    """Indices of samples start .. start+count-1 of an endless stream of shuffled epochs.

    Epoch e is a permutation drawn from seed + e, so the data position is a pure function
    of the step: a resumed run reads exactly the batches it would have read. (count,)
    """
    out = []
    for i in range(start, start + count):
        epoch, j = divmod(i, n_blocks)
        out.append(epoch_permutation(n_blocks, seed + epoch)[j])
    return torch.stack(out)


_PERMUTATIONS: dict = {}


def epoch_permutation(n: int, seed: int) -> torch.Tensor:
    if (n, seed) not in _PERMUTATIONS:
        _PERMUTATIONS.clear()  # only the current epoch (and maybe the next) is ever needed
        _PERMUTATIONS[(n, seed)] = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return _PERMUTATIONS[(n, seed)]


def micro_batch(blocks: torch.Tensor, step: int, micro: int, args, accelerator) -> torch.Tensor:
    """This process's share of micro-step ``micro`` of optimizer step ``step``. (batch_size, seq_len)

    Every optimizer step consumes batch_size * grad_accum * num_processes blocks.
    """
    per_micro = args.batch_size * accelerator.num_processes
    start = (step * args.grad_accum + micro) * per_micro + accelerator.process_index * args.batch_size
    return blocks[block_indices(len(blocks), start, args.batch_size, args.seed)].to(accelerator.device)


# --------------------------------------------------------------------------- model and stages


@dataclass
class Stage:
    name: str  # "transfer" (distill stage 1) or "train"
    index: int
    start: int  # first optimizer step (global)
    end: int  # one past the last
    lr: float


def plan_stages(args) -> list[Stage]:
    if args.mode == "distill":
        return [Stage("transfer", 0, 0, args.distill_steps, args.distill_lr),
                Stage("train", 1, args.distill_steps, args.max_steps, args.lr)]
    return [Stage("train", 0, 0, args.max_steps, args.lr)]


def fastmax_options(args) -> dict:
    return dict(p=args.fastmax_p, a0=args.fastmax_a0, a1=args.fastmax_a1, a2=args.fastmax_a2,
                temperature=args.fastmax_temperature, normalize=args.fastmax_normalize, lim=args.fastmax_lim,
                window=args.window, window_gain=args.window_gain)


def build_model(args, config):
    """scratch: random weights from ``config``; swap / distill: the pretrained softmax weights.

    distill starts from sdpa (the teacher); the others start in their final attention.
    """
    from transformers import AutoModelForCausalLM

    if args.attention == "fastmax":
        fastmax_hf.set_fastmax_config(config, **fastmax_options(args))
        if getattr(config, "sliding_window", None) is not None:  # Mistral, Qwen2: fastmax sees every past token
            print(f"note: sliding_window={config.sliding_window} switched off: fastmax attends to every "
                  "previous token", file=sys.stderr)
            config.sliding_window = None
    attention = "sdpa" if args.mode == "distill" else args.attention
    if args.mode == "scratch" or args.model in data.BUILTIN_MODELS:
        if args.mode != "scratch":
            print(f"note: --model_name_or_path {args.model} is a built-in config with random weights; "
                  f"{args.mode} then only exercises the pipeline", file=sys.stderr)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attention)
    if args.gguf_file is not None:
        return gguf_model.load_gguf_causal_lm(args.gguf_file, attn_implementation=attention, config=config).train()
    return AutoModelForCausalLM.from_pretrained(args.model, config=config, attn_implementation=attention)


def enter_stage(model, stage: Stage, args):
    """Set ``model`` up for ``stage``; returns (model, trainable parameters)."""
    if stage.name == "transfer":  # no activation checkpointing: only the student attention keeps activations
        return distill.start_attention_transfer(model, lora_rank=args.distill_lora_rank)
    if args.mode == "distill":  # merge stage 1's LoRA, fold its gains (a no-op when resuming: they are in the weights)
        model = distill.finish_attention_transfer(model)
    if args.gradient_checkpointing:
        enable_activation_checkpointing(model)
    if args.lora_rank > 0:
        model = distill.add_lora(model, rank=args.lora_rank)
    if args.learn_window_gain:  # after LoRA, which freezes what it does not adapt
        fastmax_hf.integration.learn_window_gains(model)
    return model, [p for p in model.parameters() if p.requires_grad]


def enable_activation_checkpointing(model):
    """Recompute each layer in backward (non-reentrant: works with frozen inputs and LoRA)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.24
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def make_optimizer(model, params, lr: float, weight_decay: float, window_gain_lr: float | None = None):
    """AdamW; no weight decay on vectors (norms, biases, gains). Learned window gains (--learn_window_gain)
    get their own group, whose LR is window_gain_lr / lr times the schedule's (``lr_scale``)."""
    gains = {id(p) for name, p in model.named_parameters() if name.endswith(WINDOW_GAIN_PARAMETER)}
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2 and id(p) not in gains]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0},
              {"params": [p for p in params if id(p) in gains], "weight_decay": 0.0,
               "lr_scale": (window_gain_lr or lr) / lr}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.95))


def learning_rate(step: int, stage: Stage, args) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio, within the stage."""
    length = stage.end - stage.start
    t = step - stage.start
    warmup = args.warmup_steps if args.warmup_steps is not None else max(1, length // 20)
    if t < warmup:
        return stage.lr * (t + 1) / warmup
    progress = (t - warmup) / max(1, length - warmup)
    return stage.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# --------------------------------------------------------------------------- training and evaluation


def train_step(model, optimizer, params, lr, blocks, step, stage, teacher, args, accelerator) -> float:
    """One optimizer step over --gradient_accumulation_steps micro-batches; returns the loss averaged over
    micro-batches and processes."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    step_loss = torch.zeros((), device=accelerator.device)
    for micro in range(args.grad_accum):
        input_ids = micro_batch(blocks, step, micro, args, accelerator)
        # gradients are averaged across processes only on the last micro-step
        sync = contextlib.nullcontext() if micro == args.grad_accum - 1 else accelerator.no_sync(model)
        with sync:
            loss = stage_loss(model, input_ids, stage, teacher, args, accelerator) / args.grad_accum
            accelerator.backward(loss)
        step_loss += loss.detach()
    if args.grad_clip > 0:
        accelerator.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return accelerator.reduce(step_loss, reduction="mean").item()


def stage_loss(model, input_ids: torch.Tensor, stage: Stage, teacher, args, accelerator) -> torch.Tensor:
    """Stage 1: the attention-transfer MSE. Otherwise next-token cross-entropy, mixed with
    KL(teacher || model) over the vocabulary when --kd_weight > 0."""
    if stage.name == "transfer":  # the teacher pass, then the student pass through the DDP wrapper
        distill.record_teacher(unwrap(model), input_ids)
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)  # the logits are not needed
        return distill.attention_transfer_loss(unwrap(model))
    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
    if teacher is None:
        return out.loss
    with torch.no_grad(), accelerator.autocast():
        teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits  # (B, N, V)
    return (1 - args.kd_weight) * out.loss + args.kd_weight * distill.logit_kl(out.logits, teacher_logits)


def load_teacher(args, accelerator):
    """The softmax model being converted, frozen, in sdpa: the target of --kd_weight."""
    from transformers import AutoModelForCausalLM

    if args.gguf_file is not None:
        teacher = gguf_model.load_gguf_causal_lm(args.gguf_file, attn_implementation="sdpa")
    else:
        teacher = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="sdpa")
    return teacher.requires_grad_(False).eval().to(accelerator.device)


def unwrap(model):
    """The module under a DDP wrapper (the attention records live on the real modules)."""
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, args, accelerator, stage: Stage) -> tuple[float, float]:
    """Mean next-token loss over the first --eval_blocks validation blocks, and its perplexity.

    Each process takes every num_processes-th block; sums are reduced over processes.
    During attention transfer the student (fastmax on gained queries) is evaluated.
    """
    model.eval()
    # the same number of blocks on every process: FSDP runs collectives inside each forward
    count = min(args.eval_blocks, len(blocks)) // accelerator.num_processes * accelerator.num_processes
    picked = torch.arange(count)[accelerator.process_index::accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # (sum of losses, tokens)
    student = (distill.attention_implementation(unwrap(model), distill.GAINED_ATTENTION)
               if stage.name == "transfer" else contextlib.nullcontext())
    with student:
        for batch in picked.split(args.batch_size):
            input_ids = blocks[batch].to(accelerator.device)
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)  # labels are shifted by one
            total += torch.tensor([loss.item() * tokens, tokens], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    mean = (total[0] / total[1]).item()
    return mean, math.exp(min(mean, 50.0))


# --------------------------------------------------------------------------- logs, checkpoints, outputs

# train_loss is the stage's objective: the attention-transfer MSE in "transfer", else cross-entropy
# (mixed with the teacher KL under --kd_weight); val_loss is always cross-entropy; elapsed_s counts
# training steps only, not evaluations.
LOG_FIELDS = ["step", "stage", "tokens", "lr", "train_loss", "val_loss", "val_ppl", "elapsed_s"]


def write_log(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def checkpoint_dir(args, step: int) -> Path:
    return Path(args.output_dir) / "checkpoints" / f"step_{step:06d}"


# What fixes the data order, the schedule and the model's structure: a resumed run must match.
RUN_DEFINING_ARGS = ("mode", "model", "attention", "dataset", "train_file", "seq_len", "batch_size", "grad_accum",
                     "max_steps", "distill_steps", "lora_rank", "distill_lora_rank", "kd_weight", "seed")


def run_definition(args, accelerator) -> dict:
    return {name: getattr(args, name) for name in RUN_DEFINING_ARGS} | {"num_processes": accelerator.num_processes}


def save_checkpoint(accelerator, args, step: int, stage: Stage, history: list[dict], elapsed: float):
    """Accelerator state (model, optimizer, RNG) plus the step, stage and log so far.

    The data position and the LR are functions of the step, so the step is all they need.
    Written atomically: into ``incomplete-step_XXXXXX/`` beside the final folder, trainer_state.json
    last, then renamed to ``step_XXXXXX/`` once every process has written its part. A kill at any
    instant leaves the previous checkpoints complete and usable, and no partial one under a
    checkpoint's name.
    """
    final = checkpoint_dir(args, step)
    tmp = script_common.incomplete_dir(final)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed save left behind
        tmp.parent.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's files (its RNG state) are in tmp
    if accelerator.is_main_process:
        state = dict(step=step, stage=stage.index, history=history, elapsed_s=elapsed,
                     run=run_definition(args, accelerator))
        script_common.write_durably(tmp / script_common.TRAINER_STATE, json.dumps(state))
        script_common.publish_directory(tmp, final)
    accelerator.wait_for_everyone()


def _step_of(path: Path) -> int:
    try:
        return int(path.name.removeprefix("step_"))
    except ValueError:
        return -1


def find_checkpoint(args) -> Path | None:
    """The checkpoint to resume from: the one named, which must be complete and undamaged (else
    an error naming the damaged file), or with 'latest' the newest complete one in --output_dir
    (damaged ones are skipped, each with a line saying why)."""
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        path = Path(args.resume_from_checkpoint)
        problem = script_common.checkpoint_problem(path)
        if problem is not None:
            fail(f"--resume_from_checkpoint {path}: {problem}")
        return path
    root = Path(args.output_dir) / "checkpoints"
    found = sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) >= 0), key=_step_of, reverse=True)
    skipped = []
    for path in found:
        problem = script_common.checkpoint_problem(path)
        if problem is None:
            for line in skipped:
                print(f"--resume_from_checkpoint latest: skipping {line}", file=sys.stderr)
            return path
        skipped.append(f"{path.name} ({problem})")
    if skipped:
        fail(f"--resume_from_checkpoint latest: no complete checkpoint under {root}; damaged: {'; '.join(skipped)}")
    fail(f"--resume_from_checkpoint latest: no checkpoint under {args.output_dir}/checkpoints")


def resume_state(args, resume: Path, accelerator) -> dict:
    """The checkpoint's trainer_state.json, checked against this run. What RUN_DEFINING_ARGS names
    must be as before, but --max_train_steps may grow: a run (finished or not) is extended, and its
    steps after the checkpoint follow the learning-rate schedule of the longer run. distill keeps
    the checkpoint's --distill_steps unless one is given (its default depends on --max_train_steps)."""
    state = json.loads((resume / script_common.TRAINER_STATE).read_text())
    then = state["run"]
    if args.mode == "distill" and not args.distill_steps_given and then.get("distill_steps") is not None:
        args.distill_steps = then["distill_steps"]
    now = run_definition(args, accelerator)
    extended = now["max_steps"] > then.get("max_steps", now["max_steps"])
    changed = {k: (v, then.get(k)) for k, v in now.items() if then.get(k) != v and not (k == "max_steps" and extended)}
    if changed:
        fail(f"--resume_from_checkpoint {resume} was written by a different run; now vs then: {changed} "
             "(only --max_train_steps may change, and only grow)")
    if extended:
        accelerator.print(f"extending the run of {then['max_steps']} steps to {args.max_steps}")
    return state


def choose_tracker(args) -> str | None:
    """What accelerate logs to: --report_to where its package is installed ('all': those of
    accelerate's trackers that are), else None; under --with_tracking a missing package is an error."""
    if args.report_to == "none":
        if args.with_tracking:
            fail("--with_tracking needs a --report_to tracker, not 'none'")
        return None
    if args.report_to == "all" or _installed(args.report_to):
        return args.report_to
    if args.with_tracking:
        fail(f"--with_tracking --report_to {args.report_to}: the `{args.report_to}` package is not installed "
             f"(pip install {args.report_to})")
    return None


def plot_losses(history: list[dict], stages: list[Stage], path: Path, title: str):
    """Train and validation loss by step; the attention-transfer MSE, if any, on a log axis at the right."""
    plt = script_common.pyplot()

    def points(key, stage_names):
        return [(r["step"], r[key]) for r in history if r.get(key) is not None and r["stage"] in stage_names]

    fig, ax = plt.subplots(figsize=(7, 4))
    train = points("train_loss", {"train"})
    if train:
        ax.plot(*zip(*train), lw=1, alpha=0.7, label="train")
    ax.plot(*zip(*points("val_loss", {"train", "transfer"})), "o-", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("next-token loss (nats)")
    transfer = points("train_loss", {"transfer"})
    if transfer:
        mse_ax = ax.twinx()
        mse_ax.plot(*zip(*transfer), color="tab:red", lw=1, label="attention-transfer MSE")
        mse_ax.set_yscale("log")
        mse_ax.set_ylabel("attention-transfer MSE", color="tab:red")
        for stage in stages[1:]:
            ax.axvline(stage.start, color="gray", ls="--", lw=1)
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_final_model(model, tokenizer, accelerator, args):
    """Write a plain transformers model (LoRA merged) with its fastmax options in config.json."""
    unwrapped = accelerator.unwrap_model(model)
    if args.learn_window_gain:  # the gains move into config.json's fastmax options; their parameters go
        fastmax_hf.integration.store_window_gains(unwrapped)
    if args.lora_rank > 0:  # one process or DDP (checked at the start): the weights are whole
        unwrapped, state_dict = distill.merge_lora(unwrapped), None
    else:  # under FSDP this gathers the shards (a collective: every process calls it)
        state_dict = accelerator.get_state_dict(model)
    unwrapped.save_pretrained(args.output_dir, state_dict=state_dict, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save)
    if accelerator.is_main_process:
        tokenizer.save_pretrained(args.output_dir)
        # the model card says how to load it (with fastmax_hf imported, as fastmax)
        Path(args.output_dir, "README.md").write_text(fastmax_hf.integration.model_card(unwrapped.config))


# --------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    # an explicit flag, else what `accelerate launch` was told, else bf16 on GPUs that have it
    mixed = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION") or (
        "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no")
    tracker = choose_tracker(args)
    accelerator = Accelerator(mixed_precision=mixed, log_with=tracker, project_dir=args.output_dir)
    if accelerator.distributed_type == DistributedType.FSDP and (args.mode == "distill" or args.lora_rank > 0
                                                                 or args.learn_window_gain):
        fail("FSDP runs full fine-tuning (scratch, swap); distill and --lora_rank change the model between "
             "stages or merge adapters, which needs whole weights: use DDP (scripts/accelerate_ddp.yaml)")
    set_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls (no mixed precision) on tensor cores
    torch.backends.cudnn.allow_tf32 = True
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    # ---- everything that can be wrong is checked before the first step
    resume = find_checkpoint(args)
    state = None if resume is None else resume_state(args, resume, accelerator)
    builtin = args.model in data.BUILTIN_MODELS
    pretrained_config = None if builtin else load_model_config(args)
    tokenizer = load_tokenizer(args, accelerator)
    config = pretrained_config or data.builtin_model_config(args.model, len(tokenizer), eos_token_id=tokenizer.eos_token_id)
    check_model_config(args, config, len(tokenizer))
    blocks = load_blocks(args, tokenizer, accelerator)
    if min(args.eval_blocks, len(blocks["validation"])) < accelerator.num_processes:
        fail(f"evaluation needs at least one validation block per process ({accelerator.num_processes}): "
             f"--eval_blocks {args.eval_blocks}, {len(blocks['validation'])} validation blocks")
    model = build_model(args, config)
    if args.mode == "distill":
        try:
            distill.check_foldable(model)
        except ValueError as err:
            fail(str(err))
    model.train()
    stages = plan_stages(args)
    tokens_per_step = args.batch_size * args.grad_accum * accelerator.num_processes * args.seq_len
    if accelerator.is_main_process:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{args.mode}: {type(model).__name__} {n_params / 1e6:.1f}M params, {len(blocks['train'])} train / "
              f"{len(blocks['validation'])} val blocks of {args.seq_len}, {tokens_per_step} tokens/step, "
              f"{accelerator.num_processes} process(es) on {accelerator.device}, precision {mixed}")
    if tracker is not None:  # tensorboard writes into --output_dir/tensorboard/
        accelerator.init_trackers("tensorboard" if tracker == "tensorboard" else "finetune",
                                  config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    history, step, elapsed, resume_stage = [], 0, 0.0, -1
    if state is not None:
        history, step, elapsed, resume_stage = state["history"], state["step"], state["elapsed_s"], state["stage"]
        accelerator.print(f"resuming from {resume} at step {step}")

    for stage in stages:
        if stage.index < resume_stage:
            continue  # finished before the checkpoint; its result is in the checkpoint's weights
        model, params = enter_stage(model, stage, args)
        teacher = load_teacher(args, accelerator) if stage.name == "train" and args.kd_weight > 0 else None
        optimizer = make_optimizer(model, params, stage.lr, 0.0 if stage.name == "transfer" else args.weight_decay,
                                   args.window_gain_lr if args.learn_window_gain else None)
        model, optimizer = accelerator.prepare(model, optimizer)
        params = [p for p in model.parameters() if p.requires_grad]  # as prepared (FSDP may replace them)
        if stage.index == resume_stage:
            accelerator.load_state(str(resume))
        step = max(step, stage.start)
        if step == 0:  # the starting point: for swap and distill, the model right after the switch
            val_loss, val_ppl = evaluate(model, blocks["validation"], args, accelerator, stage)
            history.append(dict(step=0, stage=stage.name, tokens=0, val_loss=val_loss, val_ppl=val_ppl, elapsed_s=0.0))

        stop = min(stage.end, args.stop_at_step or stage.end)
        bar = tqdm(range(step, stop), initial=0, desc=f"{args.mode}/{stage.name}",
                   disable=not accelerator.is_main_process, dynamic_ncols=True)
        for step in bar:
            started = time.perf_counter()
            lr = learning_rate(step, stage, args)
            step_loss = train_step(model, optimizer, params, lr, blocks["train"], step, stage, teacher, args, accelerator)
            elapsed += time.perf_counter() - started

            done = step + 1
            row = dict(step=done, stage=stage.name, tokens=done * tokens_per_step, lr=lr, train_loss=step_loss,
                       elapsed_s=round(elapsed, 3))
            if done % args.eval_every == 0 or done == stage.end:
                row["val_loss"], row["val_ppl"] = evaluate(model, blocks["validation"], args, accelerator, stage)
            history.append(row)
            accelerator.log({k: v for k, v in row.items() if isinstance(v, float)}, step=done)
            bar.set_postfix(loss=f"{row['train_loss']:.4f}", lr=f"{lr:.2e}",
                            **({"val_ppl": f"{row['val_ppl']:.2f}"} if "val_ppl" in row else {}))
            if (args.save_every and done % args.save_every == 0) or done == stop:
                save_checkpoint(accelerator, args, done, stage, history, elapsed)
            if accelerator.is_main_process:
                write_log(out / "log.csv", history)
        bar.close()
        step = stop
        if args.stop_at_step is not None and step == args.stop_at_step and step < args.max_steps:
            accelerator.print(f"stopped at step {step} (--stop_at_step); resume with --resume_from_checkpoint latest")
            accelerator.end_training()
            return history
        if stage is not stages[-1]:  # the next stage changes the model and prepares it anew
            model = accelerator.unwrap_model(model)
            accelerator.free_memory()

    save_final_model(model, tokenizer, accelerator, args)
    if accelerator.is_main_process:  # the saved model's config: learned window gains are in it
        write_results(out, args, history, stages, tokens_per_step, accelerator.unwrap_model(model).config)
    accelerator.end_training()
    return history


def write_results(out: Path, args, history, stages, tokens_per_step, config):
    evals = [r for r in history if r.get("val_loss") is not None]
    results = dict(
        mode=args.mode, model=args.model, attention=args.attention, dataset=args.dataset, train_file=args.train_file,
        steps=args.max_steps, tokens=args.max_steps * tokens_per_step, seq_len=args.seq_len,
        stages=[dict(name=s.name, start=s.start, end=s.end, lr=s.lr) for s in stages],
        fastmax=getattr(config, "fastmax", None),
        initial=dict(val_loss=evals[0]["val_loss"], val_ppl=evals[0]["val_ppl"]),
        final=dict(val_loss=evals[-1]["val_loss"], val_ppl=evals[-1]["val_ppl"]),
        evaluations=[dict(step=r["step"], stage=r["stage"], val_loss=r["val_loss"], val_ppl=r["val_ppl"]) for r in evals],
        train_time_s=history[-1]["elapsed_s"],
    )
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if _installed("matplotlib"):
        plot_losses(history, stages, out / "loss.png", f"{args.mode} ({args.attention if args.mode == 'scratch' else 'fastmax'})")
    else:
        print("matplotlib is not installed: no loss.png (log.csv has the same numbers)")
    print(f"final validation loss {results['final']['val_loss']:.4f}, perplexity {results['final']['val_ppl']:.2f}; "
          f"model, log.csv, loss.png, results.json in {out}")


def _installed(package: str) -> bool:
    """Optional outputs (tensorboard events, PNGs) are skipped where their package is missing."""
    import importlib.util

    return importlib.util.find_spec(package) is not None


if __name__ == "__main__":
    main()
