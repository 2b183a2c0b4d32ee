"""The model and tokenizer of an evaluation, and the checks of the arguments against them."""

from __future__ import annotations

import torch
from accelerate.utils import set_seed

import gguf_model
import script_common
from fastmax_hf import data
from script_common import check_vocabulary, fail, load_pretrained_config, max_positions

# Models only this script builds: the cost curves want a realistically sized model, and random
# weights are enough for time and memory. Llama-3.2-1B shapes; with the default 8k-token
# vocabulary, ~1.0B parameters.
EXTRA_MODELS = {
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8),
}
BUILTIN_MODELS = {**data.BUILTIN_MODELS, **EXTRA_MODELS}


def known_implementations() -> list[str]:
    """Every attention implementation name transformers accepts (fastmax once fastmax_hf is imported)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ["eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()]


def generated_tokens(args) -> int:
    """How many tokens past the longest prompt the generating sections need to position."""
    counts = {"passkey": args.passkey_new_tokens, "cost": args.decode_tokens}
    return max([counts[s] for s in args.sections if s in counts], default=0)


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


def load_tokenizer(args, accelerator):
    """--tokenizer, else the model's own (--gguf_file: the one it embeds), else (built-in models) the
    default BPE, trained once."""
    return script_common.load_tokenizer(args, accelerator, builtin=args.model in BUILTIN_MODELS)


def pretrained_config(args):
    """The config of --gguf_file, or of a hub id / local directory --model."""
    if args.gguf_file is not None:
        try:
            return gguf_model.load_gguf_config(args.gguf_file)
        except (ValueError, ImportError) as err:
            fail(str(err))
    return load_pretrained_config(args.model, BUILTIN_MODELS)


def model_config(args, tokenizer):
    """A built-in config sized for --lengths, or the pretrained model's (with --max_positions)."""
    from transformers import LlamaConfig

    positions = args.max_positions or args.lengths[-1] + generated_tokens(args)
    if args.model in data.BUILTIN_MODELS:
        return data.builtin_model_config(args.model, len(tokenizer), positions, tokenizer.eos_token_id)
    if args.model in EXTRA_MODELS:  # the same conventions as data.builtin_model_config
        eos = tokenizer.eos_token_id
        return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=positions, bos_token_id=eos,
                           eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True, **EXTRA_MODELS[args.model])
    config = pretrained_config(args)
    if args.max_positions is not None:
        if not uses_rope(config):
            fail(f"--max_positions: model type {config.model_type!r} has a learned position table of "
                 f"{max_positions(config)} entries that cannot be extended")
        config.max_position_embeddings = args.max_positions
    check_vocabulary(config, len(tokenizer))
    return config


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def load_model(args, config, device, dtype):
    """Random weights for built-in configs (the same on every process: seeded), else from_pretrained
    (--gguf_file: its weights dequantized to ``dtype``)."""
    from transformers import AutoModelForCausalLM

    if args.model in BUILTIN_MODELS:
        set_seed(args.seed)
        with torch.device(device):  # initialise on the device: a 1B model is slow to fill on the CPU
            model = AutoModelForCausalLM.from_config(config, attn_implementation=args.attn[0])
        model = model.to(dtype)
    elif args.gguf_file is not None:
        model = gguf_model.load_gguf_causal_lm(args.gguf_file, dtype, attn_implementation=args.attn[0],
                                               config=config).to(device)
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
