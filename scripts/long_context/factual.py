"""The short factual prompts (scripts/factual_prompts.json): does the model still know what its
teacher knew? Greedy completions, one prompt at a time; an answer counts when the completion
contains one of the prompt's answers (scripts/factual_prompts.py).

Short prompts run fastmax in its quadratic regime and decode from its recurrent state, so this
is also a check of cached generation on real text.
"""

from __future__ import annotations

from factual_prompts import DEFAULT_MAX_NEW_TOKENS, ask_factual_prompts, load_factual_prompts


def run(model, tokenizer, args, results, save, accelerator):
    """The section: every implementation not yet in ``results["factual"]``; ``save`` after each.
    Only the main process asks (a dozen short prompts)."""
    prompts = load_factual_prompts()
    for name in args.attn:
        if name in results["factual"]:
            continue
        if accelerator.is_main_process:
            model.set_attn_implementation(name)
            report = ask_factual_prompts(model, tokenizer, prompts, max_new_tokens=DEFAULT_MAX_NEW_TOKENS)
            results["factual"][name] = report
            accelerator.print(f"factual/{name}: {report['answered']} of {report['total']} answered")
            save()
