"""Static decoding: generate(..., cache_implementation="static") on a fastmax model.

On a CPU (these tests) the static FastmaxCache folds every decoding step into the state in
place, and generate() decodes eagerly (transformers compiles only on accelerators); what must
hold is that the in-place steps run, keep the state's addresses and generate exactly what the
default cache and a full recomputation generate. The CUDA-graph replay itself is tested on a
GPU (tests/test_gpu.py), where generate() hands the steps to the model's DecodeGraphRunner.
"""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

import fastmax_hf
from fastmax_hf import FastmaxCache, set_fastmax_config
from fastmax_hf.integration import DecodeGraphRunner, cache as cache_module, patches
from fastmax_hf.integration.graphs import _replayable_cache

VOCAB = 61
OPTIONS = dict(a1=0.9, a2=0.4, normalize=True, lim=0.9)


def tiny(config_class, **fields):
    config = config_class(vocab_size=VOCAB, initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                          **fields)
    set_fastmax_config(config, **OPTIONS)
    return config


CONFIGS = {
    "llama": lambda: tiny(LlamaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2),
    "qwen2": lambda: tiny(Qwen2Config, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=1),
    "gpt2": lambda: tiny(GPT2Config, n_embd=32, n_layer=2, n_head=4, attn_pdrop=0.0, resid_pdrop=0.0,
                         embd_pdrop=0.0),
}
# hybrid windows: one shorter than the prompt, one that the prompt and the first steps do not fill
WINDOWS = {"llama": 3, "gpt2": 10}


def windowed(name):
    config = CONFIGS[name]()
    set_fastmax_config(config, **OPTIONS, window=WINDOWS[name])
    return config


for _name in WINDOWS:
    CONFIGS[f"{_name}_window"] = lambda _name=_name: windowed(_name)


def build(name, implementation="fastmax"):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIGS[name]()), attn_implementation=implementation)
    return model.to(torch.float64).eval()


def batch():
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture
def in_place_steps(monkeypatch):
    """Counts the cache's in-place steps and records the state addresses they see."""
    seen = []
    original = cache_module.decode_step_

    def counting(q, k, v, state, options, **kwargs):
        seen.append(tuple(t.data_ptr() for t in state.tensors()))
        return original(q, k, v, state, options, **kwargs)

    monkeypatch.setattr(cache_module, "decode_step_", counting)
    return seen


MODES = {
    "greedy": dict(do_sample=False),
    "beams": dict(do_sample=False, num_beams=3),
    "sampling": dict(do_sample=True, top_k=7),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_static_generation_equals_the_default_cache_and_recomputation(name, mode, in_place_steps):
    model = build(name)
    ids, mask = batch()
    new = 6

    def run(**kwargs):
        torch.manual_seed(11)
        return model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                              return_dict_in_generate=True, output_logits=True, **MODES[mode], **kwargs)

    static = run(cache_implementation="static")
    steps = len(in_place_steps)
    dynamic = run()
    if model.config.fastmax["window"] is None:
        assert len(in_place_steps) == 2 * steps  # the default cache steps in place too
    else:
        assert len(in_place_steps) == steps  # the default cache grows a window's tail by new tensors
    recomputed = run(use_cache=False)
    cache = getattr(static, "cache", None) or static.past_key_values
    assert isinstance(cache, FastmaxCache) and cache.static and cache.is_compileable
    assert torch.equal(static.sequences, dynamic.sequences)
    assert torch.equal(static.sequences, recomputed.sequences)
    for a, b in zip(static.logits, recomputed.logits):
        assert (a - b).abs().max() < 1e-9
    layers = model.config.num_hidden_layers
    assert steps == layers * (new - 1)  # every step after the prompt, in place
    assert len(set(in_place_steps[:steps][::layers])) == 1  # layer 0's state never moved


def test_the_static_cache_is_compileable_and_the_default_one_is_not():
    config = CONFIGS["llama"]()
    assert FastmaxCache(config=config, static=True).is_compileable
    assert not FastmaxCache(config=config).is_compileable
    assert not FastmaxCache().is_compileable  # no layers yet
    assert FastmaxCache(static=True).layer(3).static  # layers added on first use are static too


def test_the_compiled_call_of_a_fastmax_model_is_the_graph_runner():
    model = build("llama")
    runner = model.get_compiled_call(None)
    assert isinstance(runner, DecodeGraphRunner) and runner is model.get_compiled_call(None)
    sdpa = build("llama", "sdpa")
    assert not isinstance(sdpa.get_compiled_call(None), DecodeGraphRunner)
    patches.unpatch_compiled_call()
    try:
        assert not isinstance(build("llama").get_compiled_call(None), DecodeGraphRunner)
    finally:
        patches.patch_compiled_call()


def test_the_runner_decodes_eagerly_without_a_cuda_state():
    """On a CPU no call is replayable: the runner calls the model, and computes what it computes."""
    model = build("llama")
    runner = model.get_compiled_call(None)
    ids, mask = batch()
    cache = FastmaxCache(config=model.config, static=True)
    out = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0), use_cache=True,
                **{_cache_kwarg(model): cache})
    assert not _replayable_cache(cache)  # CPU state
    eager_before = runner.eager
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    stepped = runner(input_ids=nxt, attention_mask=mask, position_ids=positions[:, -1:], use_cache=True,
                     **{_cache_kwarg(model): cache})
    assert runner.eager == eager_before + 1 and runner.captures == 0
    full = model(torch.cat([ids, nxt], 1), attention_mask=mask, position_ids=positions, use_cache=False)
    assert (stepped.logits[:, -1] - full.logits[:, -1]).abs().max() < 1e-9


def _cache_kwarg(model):
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def test_other_static_implementations_are_refused():
    model = build("llama")
    ids, mask = batch()
    with pytest.raises(ValueError, match="'static' for decoding steps replayed as CUDA graphs"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="offloaded_static")


def test_a_key_value_cache_family_refuses_a_static_cache():
    """A family that keeps transformers' key/value cache under fastmax (DiffLlama) would get a
    preallocated StaticCache, whose empty slots fastmax's end-aligned causal mask cannot exclude."""
    from transformers import DiffLlamaConfig

    config = tiny(DiffLlamaConfig, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fastmax").eval()
    ids, mask = batch()
    with pytest.raises(ValueError, match="'diffllama' model's prompt would attend to the empty slots"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, cache_implementation="static")


def test_a_static_window_state_keeps_its_full_tail_from_the_prompt_on():
    """A static cache's hybrid-window layers hold all W positions after the prompt (the missing
    ones marked as padding): the form that decodes in place and that the runner may replay."""
    model = build("gpt2_window")
    ids, mask = batch()
    cache = FastmaxCache(config=model.config, static=True)
    model(ids, attention_mask=mask, use_cache=True, **{_cache_kwarg(model): cache})
    for layer in cache.layers:
        assert layer.state.tail_k.shape[2] == WINDOWS["gpt2"] > ids.shape[1]
        assert not layer.state.tail_valid[:, : WINDOWS["gpt2"] - ids.shape[1]].any()
    state = cache.layers[0].state
    dynamic = FastmaxCache(config=model.config)
    model(ids, attention_mask=mask, use_cache=True, **{_cache_kwarg(model): dynamic})
    assert dynamic.layers[0].state.tail_k.shape[2] == ids.shape[1]  # the default cache's tail as long as seen
    assert not _replayable_cache(cache)  # a CPU state, but not for its window: see test_gpu.py
    assert state.S.device.type == "cpu"


def test_the_runners_padded_steps_put_a_window_state_back():
    """The runner's warm-up and check run steps with padded tokens. A padded token joins nothing,
    but in a hybrid window it is a position: it moves the tail. The runner copies windowed
    layers' states before such a step and puts them back (here on the CPU, the same code)."""
    model = build("llama_window")
    ids, mask = batch()
    cache = FastmaxCache(config=model.config, static=True)
    out = model(ids, attention_mask=mask, use_cache=True, **{_cache_kwarg(model): cache})
    runner = model.get_compiled_call(None)
    valid = torch.zeros(ids.shape[0], dtype=torch.bool)
    runner._set_valid(cache, valid)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    call = dict(input_ids=nxt, position_ids=torch.full_like(nxt, ids.shape[1]), use_cache=True,
                **{_cache_kwarg(model): cache})
    before = [t.clone() for layer in cache.layers for t in layer.state.tensors()]
    runner._eager_padded(call, cache, valid)
    after = [t for layer in cache.layers for t in layer.state.tensors()]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    model(**call)  # the same padded step, without the runner: the tails move
    moved = [t for layer in cache.layers for t in layer.state.tensors()]
    assert not all(torch.equal(a, b) for a, b in zip(before, moved))


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gemma", "gpt_neox"])
def test_windowed_static_generation_of_other_families(family, in_place_steps):
    """Beyond llama/gpt2: a hybrid window (shorter than the prompt) decoded in place by a static
    cache generates what recomputation generates, greedy and with beams (float32)."""
    from families import tiny_config

    config = tiny_config(family)
    if getattr(config, "sliding_window", None) is not None:
        config.sliding_window = None
    set_fastmax_config(config, window=4, window_gain=0.7)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fastmax").float().eval()
    ids, mask = batch()
    ids = ids.remainder(config.vocab_size)
    for search in (dict(do_sample=False), dict(num_beams=2, do_sample=False)):
        runs = [model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, pad_token_id=0, **search,
                               **kwargs) for kwargs in (dict(cache_implementation="static"), dict(use_cache=False))]
        assert torch.equal(runs[0], runs[1]), search
    assert in_place_steps  # the static runs stepped in place


def test_importing_keeps_the_patch_installed():
    assert fastmax_hf.integration.patches._ORIGINAL_COMPILED_CALL is not patches._MISSING
