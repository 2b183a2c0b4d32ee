"""The parts of scripts/eval_long_context.py, which holds only its command line.

    models.py      the model and tokenizer, and the checks of the arguments against them
    results.py     results.json: the settings it was made with, reading and writing it, its "meta"
    sweep.py       what every section does by length: skip what is over budget or would run out
                   of memory, record out-of-memory errors, share records between processes
    perplexity.py  sliding-window perplexity on long documents
    passkey.py     the passkey-retrieval task
    cost.py        prefill time, decode latency and memory of generate()
    plots.py       the PNGs drawn from results.json
"""
