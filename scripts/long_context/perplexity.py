"""Next-token perplexity on long documents, by sliding windows of each length.

The --split's documents are joined by eos and cut into --ppl_documents of --document_tokens;
windows of each length move by --stride (default half the length), so every token but a
document's first is scored once, with the window's earlier tokens as context.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from fastmax_hf import data
from script_common import fail

from .sweep import free_memory, is_out_of_memory, share, skip_reason


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
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (1, N, hidden)
    hidden = hidden[:, -n_scored - 1:-1]  # (1, n_scored, hidden): position t predicts token t + 1
    targets = input_ids[:, -n_scored:]  # (1, n_scored)
    head = model.get_output_embeddings()
    total = 0.0
    for start in range(0, n_scored, chunk):
        logits = head(hidden[:, start:start + chunk]).float()  # (1, chunk, vocab)
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
        window = document[begin:end].unsqueeze(0).to(model.device)  # (1, end - begin)
        nll += window_nll(model, window, end - done)
        scored, windows, done = scored + end - done, windows + 1, end
        if end == n:
            break
    return nll, scored, windows


def perplexity_point(model, documents: torch.Tensor, length: int, stride: int, accelerator) -> dict:
    """Perplexity at one length over documents (n_documents, document_tokens): this process takes
    every num_processes-th document; all gathered."""
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


def run(model, documents: torch.Tensor, args, results, save, accelerator):
    """The section: every implementation at every length not yet in ``results``; ``save`` after each."""
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
