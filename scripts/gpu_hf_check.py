"""Long-context generation with attn_implementation="fastmax" next to sdpa, on one GPU.

A Llama-shaped model (Llama-3.2-1B sizes by default, ~1.24B parameters, random weights built
from a config, bf16) prefills a long prompt (128k tokens by default) and generates a fixed
number of tokens (1k) through ``model.generate``: fastmax from its constant-size recurrent
state (FastmaxCache, chosen by generate() itself), sdpa from transformers' key/value cache.
Per run: prefill time, per-token decode latency (median / mean / p90, first and last 64
tokens), the cache's bytes, how much allocated memory grew during decoding, and peak memory.
If sdpa runs out of memory at the full context, smaller contexts are tried, and fastmax is run
at the context where sdpa succeeded too, so that each comparison is at one context.

Before anything is timed: fastmax (Triton when available) and its recurrent step are checked
against float64 Fastmax (``fastmax_reference``) on random inputs of the model's head shapes, and
the model's cached prefill is checked against its stateless forward.

    python scripts/gpu_hf_check.py --out benchmarks/results/hf_generation_h100.json
    python scripts/gpu_hf_check.py --out /tmp/smoke.json --tiny --device cpu    # CPU smoke test

No network is needed: the model is built from a config, the prompt is random token ids.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import os
import platform
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList

import fastmax_hf
from fastmax_hf import FastmaxCache, fastmax, fastmax_reference
from fastmax_hf.functional import triton_available
from fastmax_hf.recurrent import fastmax_step


def build_config(args) -> LlamaConfig:
    if args.tiny:
        sizes = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=512)
    else:  # Llama-3.2-1B
        sizes = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256)
    config = LlamaConfig(
        **sizes,
        max_position_embeddings=args.context + args.new_tokens + 16,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=None,  # random weights: never stop early
        pad_token_id=0,
    )
    fastmax_hf.set_fastmax_config(config)  # defaults: p=2, a0=1, a1=1, a2=0.5, temperature=1
    return config


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def allocated(device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


# ---------------------------------------------------------------------------------------------
# Correctness before timing
# ---------------------------------------------------------------------------------------------


def check_kernels(config, device, dtype, length: int) -> dict:
    """fastmax (causal) and fastmax_step (prefill + decode) vs float64 fastmax_reference."""
    g = torch.Generator(device="cpu").manual_seed(0)
    head_dim = config.hidden_size // config.num_attention_heads
    Hq, Hk = config.num_attention_heads, config.num_key_value_heads
    q = torch.randn(1, Hq, length, head_dim, generator=g)
    k = torch.randn(1, Hk, length, head_dim, generator=g)
    v = torch.randn(1, Hk, length, head_dim, generator=g)
    expected = fastmax_reference(q.double(), k.double(), v.double(), causal=True)
    q, k, v = (x.to(device=device, dtype=dtype) for x in (q, k, v))
    out = fastmax(q, k, v, causal=True)
    split = length - 16
    prefill, state = fastmax_step(q[:, :, :split], k[:, :, :split], v[:, :, :split], None)
    steps = [prefill]
    for t in range(split, length):
        step, state = fastmax_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state)
        steps.append(step)
    return {
        "length": length,
        "fastmax_rel_err": rel_err(out.cpu(), expected),
        "recurrent_rel_err": rel_err(torch.cat(steps, dim=2).cpu(), expected),
        "state_layout": getattr(state, "layout", "torch"),
    }


@torch.no_grad()
def check_model(model, device, length: int) -> dict:
    """The FastmaxCache prefill (recurrent path) against the stateless forward, same weights."""
    g = torch.Generator(device="cpu").manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, length), generator=g).to(device)
    stateless = model(ids, use_cache=False).logits.float()
    cache = FastmaxCache(config=model.config)
    cache_kwarg = "cache" if "cache" in inspect.signature(type(model.model).forward).parameters else "past_key_values"
    cached = model(ids, use_cache=True, **{cache_kwarg: cache}).logits.float()
    return {"length": length, "cached_vs_stateless_logits_rel_err": rel_err(cached, stateless)}


# ---------------------------------------------------------------------------------------------
# Timed generation
# ---------------------------------------------------------------------------------------------


class StepClock(LogitsProcessor):
    """Called by generate() once per forward: the time and the allocated memory after each."""

    def __init__(self, device):
        self.device, self.times, self.allocated = device, [], []

    def __call__(self, input_ids, scores):
        sync(self.device)
        self.times.append(time.perf_counter())
        self.allocated.append(allocated(self.device))
        return scores


def cache_bytes(cache) -> int:
    if isinstance(cache, FastmaxCache):
        return cache.nbytes()
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def summarize(latencies_s: list[float]) -> dict:
    ms = [x * 1e3 for x in latencies_s]
    if not ms:
        return {}
    ordered = sorted(ms)
    window = min(64, len(ms))
    return {
        "median": statistics.median(ms),
        "mean": statistics.fmean(ms),
        "p90": ordered[min(len(ordered) - 1, int(math.ceil(0.9 * len(ordered))) - 1)],
        "min": ordered[0],
        "max": ordered[-1],
        f"first{window}_mean": statistics.fmean(ms[:window]),
        f"last{window}_mean": statistics.fmean(ms[-window:]),
    }


@torch.no_grad()
def timed_generate(model, implementation: str, context: int, new_tokens: int, device) -> dict:
    model.set_attn_implementation(implementation)
    g = torch.Generator(device="cpu").manual_seed(context)
    ids = torch.randint(3, model.config.vocab_size, (1, context), generator=g).to(device)
    mask = torch.ones_like(ids)
    record = {"implementation": implementation, "context": context, "new_tokens": new_tokens}
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = allocated(device)
    clock = StepClock(device)
    try:
        sync(device)
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0, logits_processor=LogitsProcessorList([clock]), return_dict_in_generate=True,
        )
        sync(device)
        end = time.perf_counter()
    except torch.OutOfMemoryError as error:
        record["error"] = f"out of memory: {str(error).splitlines()[0]}"
        return record
    finally:
        if device.type == "cuda":
            record["peak_allocated_bytes_above_weights"] = torch.cuda.max_memory_allocated(device) - base
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    decode = [b - a for a, b in zip(clock.times, clock.times[1:])]
    record.update(
        generated_tokens=int(out.sequences.shape[1] - context),
        prefill_s=clock.times[0] - start,
        total_s=end - start,
        decode_ms_per_token=summarize(decode),
        cache_class=type(cache).__name__,
        cache_bytes=cache_bytes(cache),
        cache_seq_length=cache.get_seq_length() if cache is not None else None,
        allocated_growth_during_decode_bytes=(clock.allocated[-1] - clock.allocated[0]) if clock.allocated else 0,
    )
    del out, cache
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--context", type=int, default=131072, help="prompt length (tokens)")
    parser.add_argument("--new-tokens", type=int, default=1024)
    parser.add_argument("--sdpa-fallback", default="65536,32768,16384",
                        help="smaller contexts to try, in order, if sdpa runs out of memory at --context")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, for a quick smoke test")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    torch.manual_seed(0)
    config = build_config(args)

    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "fastmax_hf": fastmax_hf.__version__,
        "triton_kernels": triton_available(device),
        "dtype": args.dtype,
        "config": {k: getattr(config, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "num_key_value_heads", "vocab_size")},
        "fastmax_options": config.fastmax,
    }
    print(f"{results['device']}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"triton kernels: {results['triton_kernels']}")

    results["kernel_check"] = check_kernels(config, device, dtype, length=256 if args.tiny else 4096)
    print("kernel check:", results["kernel_check"])

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="fastmax")
    model = model.to(device=device, dtype=dtype).eval()
    results["parameters"] = sum(p.numel() for p in model.parameters())
    results["weights_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {results['parameters'] / 1e9:.3f}B parameters, {results['weights_bytes'] / 2**30:.2f} GiB")

    results["model_check"] = check_model(model, device, length=128 if args.tiny else 2048)
    print("model check:", results["model_check"])

    # Warm-up: Triton compilation, cuBLAS handles, allocator.
    for implementation in ("fastmax", "sdpa"):
        timed_generate(model, implementation, context=256, new_tokens=8, device=device)

    runs = []

    def run(implementation, context):
        record = timed_generate(model, implementation, context, args.new_tokens, device)
        runs.append(record)
        shown = {k: record.get(k) for k in ("implementation", "context", "prefill_s", "cache_bytes",
                                            "allocated_growth_during_decode_bytes", "error")}
        shown["decode_median_ms"] = record.get("decode_ms_per_token", {}).get("median")
        print(json.dumps(shown))
        with open(args.out, "w") as f:  # keep what is measured even if a later run dies
            json.dump(dict(results, runs=runs), f, indent=2)
        return record

    run("fastmax", args.context)
    sdpa = run("sdpa", args.context)
    if "error" in sdpa:
        for context in [int(c) for c in args.sdpa_fallback.split(",") if c]:
            if context >= args.context:
                continue
            sdpa = run("sdpa", context)
            if "error" not in sdpa:
                run("fastmax", context)  # the same context, for a like-for-like comparison
                break

    results["runs"] = runs
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
