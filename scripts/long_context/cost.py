"""Prefill time, per-token decode latency and peak memory of generate(), by prompt length.

fastmax decodes from its constant-size recurrent state (FastmaxCache), softmax implementations
from the key/value cache. Prompts are random token ids. CUDA: CUDA events and
max_memory_allocated; CPU: wall clock and the sampled resident set size. Measured on the main
process only; the others receive its records.
"""

from __future__ import annotations

import math
import os
import statistics
import threading
import time

import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessor, LogitsProcessorList

import fastmax_hf
from script_common import fail

from .sweep import free_memory, is_out_of_memory, share, skip_reason

# How far generate()'s logits may lie from the stateless forward pass's before nothing is timed
# (relative error, see cached_decoding_error). float32: the two paths differ by rounding
# (~1e-6 on the CPU). Half precision rounds every layer's activations: the logits of a 2048-token
# prefill into a FastmaxCache were 0.026 from the stateless ones for a random-weight Llama-3.2-1B
# in bf16 on an H100 (torch 2.11), which leaves a margin of 4.
CACHED_DECODING_TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 0.1, torch.float16: 0.1}
# The check's prompt, at most: it compares two computations, which a short prompt shows as well
# as a long one, and the stateless pass it runs is not what is being measured.
CHECK_PROMPT_TOKENS = 1024


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


def random_prompt(model, length: int, seed: int) -> torch.Tensor:
    """Random token ids that depend only on the seed and the length, on the model's device. (1, length)"""
    g = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(model.device)


def greedy_generate(model, ids: torch.Tensor, new_tokens: int, **kwargs):
    """generate() of exactly ``new_tokens`` tokens after ids (1, N), greedily (random weights may
    produce an eos, which must not end the call early); the output as a dict."""
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, num_beams=1, pad_token_id=0,
                          return_dict_in_generate=True, **kwargs)


def timed_generate(model, ids: torch.Tensor, decode_tokens: int) -> tuple[list[float], object]:
    """Greedy generate() of ``decode_tokens`` tokens after ids (1, N): (seconds from the call to each
    forward pass's logits, one per pass, then to the call's end; generate()'s output)."""
    clock = StepClock(model.device)
    clock.mark()
    out = greedy_generate(model, ids, decode_tokens, logits_processor=LogitsProcessorList([clock]))
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
    ids = random_prompt(model, length, seed)
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


@torch.inference_mode()
def cached_decoding_error(model, length: int, new_tokens: int, seed: int) -> float:
    """How far the logits of generate() lie from those of one stateless forward pass over the
    same tokens: ||cached - stateless|| / ||stateless|| over the ``new_tokens`` predictions.

    generate() takes the path that is timed: the prompt's forward pass fills the cache (fastmax:
    FastmaxCache's recurrent state; softmax: keys and values), then each new token is one step
    from it. The stateless pass is the path of training and of the perplexity section. Both
    score the tokens that greedy decoding picked.
    """
    out = greedy_generate(model, random_prompt(model, length, seed), new_tokens, output_logits=True)
    cached = torch.cat(out.logits).float()  # (new_tokens, vocab): step t predicts token length + t
    # the same predictions from one pass over the prompt and every generated token but the last
    logits = model(out.sequences[:, :-1], use_cache=False, logits_to_keep=new_tokens).logits  # (1, new_tokens, vocab)
    stateless = logits[0].float()
    return ((cached - stateless).norm() / stateless.norm()).item()


def check_cached_decoding(model, name: str, length: int, args, accelerator) -> dict:
    """Before ``name`` is timed: stop if its generate() does not compute what its stateless forward
    pass computes (the times would be of a wrong computation). Run on the main process and shared,
    so that every process stops, or goes on, together."""
    length = min(length, CHECK_PROMPT_TOKENS)
    error = share([cached_decoding_error(model, length, args.decode_tokens, args.seed)]
                  if accelerator.is_main_process else [])[0]
    tolerance = CACHED_DECODING_TOLERANCE[model.dtype]
    if not error <= tolerance:  # also a NaN
        fail(f"--attn {name}: generate()'s logits lie {error:.3g} (relative) from the stateless forward pass's "
             f"over the same tokens ({length}-token prompt, {args.decode_tokens} new tokens; at most {tolerance:g} "
             f"in {str(model.dtype).removeprefix('torch.')}): its cached decoding is wrong, so nothing is timed")
    return {"prompt_tokens": length, "new_tokens": args.decode_tokens, "logits_rel_err": error,
            "tolerance": tolerance}


def run(model, args, results, save, accelerator):
    """The section: every implementation at every length not yet in ``results``; ``save`` after each.

    Before an implementation's first measurement: the check of its cached decoding (recorded in
    results["checks"]) and an untimed warm-up.
    """
    for name in args.attn:
        model.set_attn_implementation(name)
        done = results["cost"].setdefault(name, {})
        pending = [n for n in args.lengths if str(n) not in done or "skipped" in done[str(n)]]
        if pending:
            checks = results.setdefault("checks", {}).setdefault("cached_decoding", {})
            checks[name] = check_cached_decoding(model, name, pending[0], args, accelerator)
            accelerator.print(f"cost/{name}: generate()'s logits within {checks[name]['logits_rel_err']:.2g} "
                              "of the stateless forward pass's")
            if accelerator.is_main_process:
                warm_up(model, pending[0], args.seed)
        bar = tqdm(pending, desc=f"cost/{name}", disable=not accelerator.is_main_process, dynamic_ncols=True)
        for length in bar:
            reason = skip_reason(done, length, args.max_seconds_per_point)
            record = [{"skipped": reason} if reason else cost_point(model, length, args)] \
                if accelerator.is_main_process else []
            done[str(length)] = share(record)[0]
            bar.set_postfix(length=length, prefill_s=done[str(length)].get("prefill_s"))
            save()
