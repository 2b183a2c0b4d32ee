"""Decoding speed of a 1B-parameter Llama: fastmax's static cache (CUDA graphs) against sdpa.

    python tools/bench_decode.py --out benchmarks/h200/decode/decode.json \
        [--sections check,kernel,latency,throughput] [--lengths 4096,32768,131072,524288,1048576]

Llama-3.2-1B shapes (16 layers, 32 query / 8 key-value heads, D = 64, hidden 2048), an 8k
vocabulary, random weights, bf16; each implementation gets its own copy of the config.

Sections (each records what it measured; every ratio is of two timings of one run):
- ``check``: before anything is timed, greedy generate() with cache_implementation="static"
  (replayed CUDA graphs) against a stateless forward over the generated tokens, and against
  the default FastmaxCache, for a left-padded batch; the runner's capture / replay counts.
- ``kernel``: one attention layer's decoding step alone, at batch 1 and 64: the chunked path
  the default cache takes (``triton_step``) against the in-place step (``decode_step_``),
  and the bytes of state each streams per ms.
- ``latency``: batch 1, generate() of --new_tokens after a random prompt of each length, ms per
  new token (median of the steps) and prefill seconds, first and repeated call, for
  fastmax (default cache, eager steps), fastmax-static (CUDA graphs), sdpa (DynamicCache) and
  sdpa-static (transformers' StaticCache with its automatic torch.compile, mode
  reduce-overhead) up to --sdpa_max_length; past it, sdpa-static continues from a StaticCache
  filled synthetically with random keys/values (said in the record), sdpa is skipped.
- ``throughput``: decoded tokens per second (batch / step time) at --throughput_lengths, for
  batch sizes doubling from 1 until memory runs out. Caches filled synthetically, as said in
  the record: sdpa's DynamicCache holds random keys and values of the context's length in every
  layer (what a prefill would leave, at the same size); fastmax's state is that of a 16-token
  prompt (its size, and a step's cost, do not depend on the context). Position ids are the
  context's. fastmax steps are replayed graphs (the static cache's runner), sdpa's eager with
  the flash backend (cuDNN, SDPA's first choice, plans anew for every key length, every step).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessor, LogitsProcessorList
from transformers.cache_utils import DynamicCache

import fastmax_hf
from fastmax_hf import FastmaxCache
from fastmax_hf.kernels import decode_step_, empty_state, triton_step
from gpu_common import bench_ms, is_oom, require_cuda, run_metadata

LLAMA_1B = dict(vocab_size=8192, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=1 << 21,
                rope_theta=500000.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def build(implementation: str):
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B)  # one config object per model: from_config writes the implementation into it
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation,
                                             dtype=torch.bfloat16)
    return model.cuda().eval()


def cache_name(model) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


class StepClock(LogitsProcessor):
    """A CUDA event after every forward pass of generate()."""

    def __init__(self):
        self.events = []

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def __call__(self, input_ids, scores):
        self.mark()
        return scores


def timed_generate(model, ids, new_tokens, **kwargs) -> dict:
    clock = StepClock()
    clock.mark()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([clock]), **kwargs)
    clock.mark()
    torch.cuda.synchronize()
    ev = clock.events
    steps = [ev[i].elapsed_time(ev[i + 1]) for i in range(1, len(ev) - 2)]
    return {"prefill_s": ev[0].elapsed_time(ev[1]) / 1e3, "decode_ms_median": statistics.median(steps),
            "decode_ms_min": min(steps), "decode_ms_max": max(steps)}


# ---------------------------------------------------------------------------------------------


@torch.inference_mode()
def section_check(models, args) -> dict:
    """Static generation (graphs) against recomputation and the default cache, left-padded batch."""
    model = models["fastmax"]
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, LLAMA_1B["vocab_size"], (3, 300), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[1, :40] = 0
    mask[2, :7] = 0
    ids = ids.masked_fill(mask == 0, 0)
    runner = model.get_compiled_call(None)
    before = (runner.captures, runner.replays)
    kw = dict(attention_mask=mask, max_new_tokens=24, min_new_tokens=24, do_sample=False, pad_token_id=0,
              return_dict_in_generate=True, output_logits=True)
    static = model.generate(ids, cache_implementation="static", **kw)
    dynamic = model.generate(ids, **kw)

    def rel_to_stateless(out) -> float:
        """Each step's logits against a stateless forward over the tokens this run generated."""
        full_mask = torch.cat([mask, torch.ones_like(out.sequences[:, ids.shape[1]:])], 1)[:, :-1]
        positions = (full_mask.cumsum(-1) - 1).clamp_min(0)
        stateless = model(out.sequences[:, :-1], attention_mask=full_mask, position_ids=positions,
                          use_cache=False).logits[:, ids.shape[1] - 1:].float()
        cached = torch.stack(out.logits, 1).float()
        return ((cached - stateless).norm() / stateless.norm()).item()

    rel = rel_to_stateless(static)
    rel_default = rel_to_stateless(dynamic)
    record = {
        "static_vs_stateless_logits_rel_err": rel,
        "default_cache_vs_stateless_logits_rel_err": rel_default,
        "static_equals_default_cache_sequences": bool(torch.equal(static.sequences, dynamic.sequences)),
        "first_divergence_step": _first_divergence(static.sequences, dynamic.sequences, ids.shape[1]),
        "captures": runner.captures - before[0], "replays": runner.replays - before[1],
        "cache_class": type(returned_cache(static)).__name__, "tolerance": 0.05,
    }
    record["kernels_per_step"] = _kernels_per_step(model)
    print("check", record, flush=True)
    if not max(rel, rel_default) <= 0.05 or record["replays"] == 0:
        raise SystemExit(f"static decoding check failed: {record}")
    return record


def _kernels_per_step(model) -> int:
    """CUDA kernels one eager decoding step launches (batch 1, after a 16-token prompt): what a
    replayed graph runs back to back."""
    name = cache_name(model)
    cache = FastmaxCache(config=model.config, static=True)
    model(input_ids=torch.randint(3, 100, (1, 16), device="cuda"), use_cache=True, **{name: cache})
    step = dict(input_ids=torch.randint(3, 100, (1, 1), device="cuda"),
                position_ids=torch.full((1, 1), 16, device="cuda"), use_cache=True, **{name: cache})
    model(**step)  # compiled and warm
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(**step)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _first_divergence(a, b, start):
    differs = (a[:, start:] != b[:, start:]).any(0).nonzero()
    return None if len(differs) == 0 else int(differs[0])


@torch.inference_mode()
def section_kernel(args) -> dict:
    """One layer's decoding step: the default cache's chunked step against the in-place kernel."""
    out = {}
    opts = fastmax_hf.FastmaxOptions.resolve(64)
    for batch in (1, 64, 512):
        Hq, Hk, D = 32, 8, 64
        q = torch.randn(batch, Hq, 1, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(batch, Hk, 1, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(batch, Hk, 1, D, device="cuda", dtype=torch.bfloat16)
        S, z = empty_state(batch, Hk, D, D, 2, "cuda")
        S.normal_()
        z.uniform_(1, 2)
        chunked = bench_ms(lambda: triton_step(q, k, v, S, z, opts)) if batch <= 64 else None
        in_place = bench_ms(lambda: decode_step_(q, k, v, S, z, opts))
        # the same bytes read and written by one elementwise kernel each: the roofline of a step
        copy_ms = bench_ms(lambda: (S.mul_(1.0), z.mul_(1.0)))
        state_bytes = S.numel() * 4 + z.numel() * 4
        out[str(batch)] = {"triton_step_ms": chunked, "decode_step_ms": in_place,
                           "speedup": None if chunked is None else chunked / in_place,
                           "state_bytes": state_bytes, "in_place_scale_ms": copy_ms,
                           "decode_step_GBps": 2 * state_bytes / in_place / 1e6,  # read and written
                           "in_place_scale_GBps": 2 * state_bytes / copy_ms / 1e6}
        print("kernel", batch, out[str(batch)], flush=True)
    return out


@torch.inference_mode()
def section_latency(models, args, results: dict) -> dict:
    variants = [("fastmax", "fastmax", {}), ("fastmax-static", "fastmax", {"cache_implementation": "static"}),
                ("sdpa", "sdpa", {}), ("sdpa-static", "sdpa", {"cache_implementation": "static"})]
    for name, implementation, kwargs in variants:
        if name not in args.variants:
            continue
        model = models[implementation]
        done = results.setdefault(name, {})
        for length in args.lengths:
            if implementation == "sdpa" and length > args.sdpa_max_length:
                if name == "sdpa-static" and args.sdpa_static_synthetic:
                    done[str(length)] = _sdpa_static_synthetic(model, length, args.new_tokens)
                    torch.cuda.empty_cache()
                    print("latency", name, length, done[str(length)], flush=True)
                    if args.write:
                        args.write()
                else:
                    done[str(length)] = {"skipped": f"longer than --sdpa_max_length {args.sdpa_max_length}"}
                continue
            ids = torch.randint(3, LLAMA_1B["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))
            ids = ids.cuda()
            try:
                start = time.perf_counter()
                first = timed_generate(model, ids, args.new_tokens, **kwargs)
                repeat = timed_generate(model, ids, args.new_tokens, **kwargs)
                done[str(length)] = {"first": first, "repeat": repeat, "seconds": time.perf_counter() - start}
                if name == "fastmax-static":
                    done[str(length)]["capture_s"] = model.get_compiled_call(None).capture_seconds
            except (torch.OutOfMemoryError, RuntimeError) as err:
                if not is_oom(err):
                    raise
                done[str(length)] = {"out_of_memory": str(err).splitlines()[0][:200]}
            torch.cuda.empty_cache()
            print("latency", name, length, done[str(length)], flush=True)
            if args.write:
                args.write()
    return results


def _fill_static_cache(cache, config, length: int) -> None:
    """Random keys and values for positions 0..length-1 of every layer, written through the cache's own
    update (what a prefill would leave there, at the same size); refilling after reset() keeps the
    addresses the compiled step was recorded with."""
    Hk, D = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    cache.reset()
    generator = torch.Generator(device="cuda").manual_seed(length)
    chunk = 1 << 16
    for layer in range(config.num_hidden_layers):
        for start in range(0, length, chunk):
            n = min(chunk, length - start)
            keys = torch.randn(1, Hk, n, D, device="cuda", dtype=torch.bfloat16, generator=generator)
            values = torch.randn(1, Hk, n, D, device="cuda", dtype=torch.bfloat16, generator=generator)
            position = torch.arange(start, start + n, device="cuda")
            cache.update(keys, values, layer, {"cache_position": position})
    if int(cache.get_seq_length()) != length:
        raise SystemExit(f"the synthetic static cache holds {int(cache.get_seq_length())} tokens, not {length}")


def _sdpa_static_synthetic(model, length: int, new_tokens: int) -> dict:
    """sdpa with transformers' StaticCache and its compiled step, the cache filled synthetically with
    ``length`` tokens instead of by a prefill (minutes of quadratic attention at 512k-1M tokens): generate()
    continues from it, so the first forward is one token and every later step is the compiled call, as
    after a real prefill. First and repeated call, the cache refilled in place between them."""
    from transformers.cache_utils import StaticCache

    ids = torch.randint(3, LLAMA_1B["vocab_size"], (1, length + 1), generator=torch.Generator().manual_seed(length))
    ids = ids.cuda()
    try:
        cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 8)
        result = {"fill": "synthetic: random keys/values at every position before the prompt's last token; "
                          "prefill_s is that one token's forward"}
        start = time.perf_counter()
        for call in ("first", "repeat"):
            _fill_static_cache(cache, model.config, length)
            result[call] = timed_generate(model, ids, new_tokens, **{cache_name(model): cache})
        result["seconds"] = time.perf_counter() - start
        del cache
        return result
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not is_oom(err):
            raise
        return {"out_of_memory": str(err).splitlines()[0][:200]}


def _sdpa_step_ms(model, batch, length, steps):
    """Eager sdpa steps on a DynamicCache holding random keys/values of ``length`` tokens."""
    config = model.config
    Hk, D = config.num_key_value_heads, config.hidden_size // config.num_attention_heads
    cache = DynamicCache(config=config)
    for layer in range(config.num_hidden_layers):
        kv = torch.randn(batch, Hk, length, D, device="cuda", dtype=torch.bfloat16)
        cache.update(kv, kv.clone(), layer)
        del kv
    ids = torch.randint(3, 100, (batch, 1), device="cuda")
    name = cache_name(model)
    times = []
    # flash attention: cuDNN, SDPA's first choice, plans anew for every key length, i.e. every step
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        for step in range(steps):
            pos = torch.full((batch, 1), length + step, device="cuda")
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            model(input_ids=ids, position_ids=pos, use_cache=True, **{name: cache})
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times[2:])


def _fastmax_step_ms(model, batch, length, steps):
    """Replayed static-cache steps after a 16-token prompt, at the positions of ``length``."""
    name = cache_name(model)
    cache = FastmaxCache(config=model.config, static=True)
    prompt = torch.randint(3, 100, (batch, 16), device="cuda")
    model(input_ids=prompt, use_cache=True, **{name: cache})
    runner = model.get_compiled_call(None)
    ids = torch.randint(3, 100, (batch, 1), device="cuda")
    times = []
    for step in range(steps):
        pos = torch.full((batch, 1), length + step, device="cuda")
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        runner(input_ids=ids, position_ids=pos, use_cache=True, **{name: cache})
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    if runner.replays == 0:
        raise SystemExit("the fastmax throughput steps were not replayed as graphs")
    return statistics.median(times[2:])


@torch.inference_mode()
def section_throughput(models, args, results: dict) -> dict:
    results["fill"] = ("synthetic: sdpa's keys/values random at the context's length; fastmax's state from a "
                       "16-token prompt (its size and step cost do not depend on the context)")
    for implementation, step_ms in (("fastmax", _fastmax_step_ms), ("sdpa", _sdpa_step_ms)):
        model = models[implementation]
        for length in args.throughput_lengths:
            points = results.setdefault(implementation, {}).setdefault(str(length), {})
            batch = 1
            while batch <= args.max_batch:
                try:
                    ms = step_ms(model, batch, length, args.steps)
                    points[str(batch)] = {"step_ms": ms, "tokens_per_s": batch / ms * 1e3}
                except (torch.OutOfMemoryError, RuntimeError) as err:
                    if not is_oom(err):
                        raise
                    points[str(batch)] = {"out_of_memory": True}
                    torch.cuda.empty_cache()
                    break
                torch.cuda.empty_cache()
                print("throughput", implementation, length, batch, points[str(batch)], flush=True)
                if time.perf_counter() > args.deadline:
                    points["stopped"] = "time budget"
                    break
                batch *= 2
            if args.write:
                args.write()
    for length in args.throughput_lengths:
        best = {}
        for implementation in ("fastmax", "sdpa"):
            rows = [(v["tokens_per_s"], int(b)) for b, v in results.get(implementation, {}).get(str(length), {}).items()
                    if isinstance(v, dict) and "tokens_per_s" in v]
            if rows:
                best[implementation] = {"tokens_per_s": max(rows)[0], "batch": max(rows)[1],
                                        "largest_batch": max(b for _, b in rows)}
        if len(best) == 2:
            best["ratio"] = best["fastmax"]["tokens_per_s"] / best["sdpa"]["tokens_per_s"]
        results.setdefault("best", {})[str(length)] = best
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--sections", default="check,kernel,latency,throughput")
    p.add_argument("--lengths", default="4096,32768,131072,524288,1048576")
    p.add_argument("--variants", default="fastmax,fastmax-static,sdpa,sdpa-static",
                   help="latency: which of fastmax, fastmax-static, sdpa, sdpa-static")
    p.add_argument("--sdpa_max_length", type=int, default=131072,
                   help="latency: longest context sdpa prefills for real (default 131072)")
    p.add_argument("--sdpa_static_synthetic", action=argparse.BooleanOptionalAction, default=True,
                   help="latency: past --sdpa_max_length, time sdpa-static from a synthetically filled "
                        "StaticCache instead of skipping it (default on)")
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--throughput_lengths", default="32768,131072")
    p.add_argument("--max_batch", type=int, default=4096)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--budget_s", type=float, default=420, help="throughput stops doubling the batch after this")
    args = p.parse_args(argv)
    require_cuda("bench_decode.py")
    args.variants = args.variants.split(",")
    args.lengths = [int(x) for x in args.lengths.split(",") if x]
    args.throughput_lengths = [int(x) for x in args.throughput_lengths.split(",") if x]
    args.deadline = time.perf_counter() + args.budget_s
    sections = args.sections.split(",")
    record = {"meta": run_metadata(), "model": LLAMA_1B}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write():
        out.write_text(json.dumps(record, indent=1))

    args.write = write
    models = {name: build(name) for name in ("fastmax", "sdpa")}
    if "check" in sections:
        record["check"] = section_check(models, args)
        write()
    if "kernel" in sections:
        record["kernel"] = section_kernel(args)
        write()
    if "latency" in sections:
        section_latency(models, args, record.setdefault("latency", {}))
        write()
    if "throughput" in sections:
        section_throughput(models, args, record.setdefault("throughput", {}))
        write()
    write()
    print(json.dumps({k: record[k] for k in record if k not in ("meta", "model", "latency")}, indent=1)[:6000])


if __name__ == "__main__":
    sys.exit(main())
