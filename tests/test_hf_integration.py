"""attn_implementation="fastmax" in transformers: logits, masks, packing, generation from a recurrent state.

Tiny randomly initialised float64 models built from configs (Llama with grouped-query attention
and RoPE, GPT-2 with its per-layer scaling), so that every comparison is exact to rounding.
The expectation for logits is Fastmax's definition (the formula at the top of README.md)
evaluated directly: an attention function that
forms f(s) on a materialised mask (transformers' own sdpa mask) and shares no code with fastmax_hf.
"""

import copy
import inspect
import warnings

import pytest
import torch
from transformers import (
    AttentionInterface,
    AutoModelForCausalLM,
    DiffLlamaConfig,
    BloomConfig,
    GPT2Config,
    LlamaConfig,
    LogitsProcessor,
    LogitsProcessorList,
    MistralConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.models.llama import modeling_llama

import fastmax_hf
from fastmax_hf import (FastmaxCache, FastmaxConfig, FastmaxUnsupportedError, feature_count, get_fastmax_config,
                        set_fastmax_config)
from fastmax_hf import notices
from fastmax_hf.integration import patches
from conftest import rel_err

VOCAB = 61
OPTIONS = dict(a0=1.0, a1=0.9, a2=0.45, temperature=1.3)  # not the defaults, so the config is really read
CACHE_KWARG = "cache" if "cache" in inspect.signature(modeling_llama.LlamaModel.forward).parameters else "past_key_values"


# ---------------------------------------------------------------------------------------------
# The independent expectation
# ---------------------------------------------------------------------------------------------


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """README.md's definition: o_i = sum_j f(s_ij) v_j / sum_j f(s_ij) over visible j."""
    options = module.config.fastmax
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (B, Hq, Nk, D)
    value = value.repeat_interleave(groups, dim=1)
    scores = (query @ key.transpose(-1, -2)) * (scaling / options["temperature"])  # (B, Hq, Nq, Nk)
    weights = options["a0"] + options["a1"] * scores + options["a2"] * scores * scores
    weights = weights * attention_mask.to(weights.dtype)  # (B, 1, Nq, Nk) bool: True = visible
    numerator, denominator = weights @ value, weights.sum(-1, keepdim=True)
    out = torch.where(denominator == 0, torch.zeros_like(numerator), numerator / denominator)
    return out.transpose(1, 2).contiguous(), None


def reference_mask(*args, **kwargs):
    """transformers' sdpa mask, always materialised (causal, padding and packed documents)."""
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(*args, **kwargs)


AttentionInterface.register("fastmax_test_reference", reference_attention)
AttentionMaskInterface.register("fastmax_test_reference", reference_mask)


# ---------------------------------------------------------------------------------------------
# Tiny models
# ---------------------------------------------------------------------------------------------


def llama_config(**overrides):
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, **overrides,
    )
    set_fastmax_config(config, **OPTIONS)
    return config


def gpt2_config(**overrides):
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2,
        scale_attn_by_inverse_layer_idx=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, **overrides,
    )
    set_fastmax_config(config, **OPTIONS)
    return config


def build(config, attn_implementation="fastmax", seed=0):
    """A float64 model of ``config``; from its own copy, since from_config writes the implementation into it."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    return model.to(torch.float64).eval()


@pytest.fixture(scope="module")
def llama():
    return build(llama_config())


@pytest.fixture(scope="module")
def gpt2():
    return build(gpt2_config())


def prompts(seed, *lengths):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]


def left_pad(rows):
    """(input_ids, attention_mask) of the rows, left-padded with token 0."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return ids, mask


def positions_from_mask(mask):
    return (mask.cumsum(-1) - 1).clamp_min(0)


def returned_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def greedy(model, ids, new_tokens, **kwargs):
    return model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


# ---------------------------------------------------------------------------------------------
# Registration, config and the mask function
# ---------------------------------------------------------------------------------------------


def test_fastmax_is_registered():
    assert AttentionInterface._global_mapping["fastmax"] is fastmax_hf.integration.fastmax_attention_forward
    assert AttentionMaskInterface._global_mapping["fastmax"] is fastmax_hf.integration.fastmax_attention_mask


def test_mask_function_gives_2d_padding_mask_or_none():
    config = llama_config()
    config._attn_implementation = "fastmax"
    embeds = torch.zeros(2, 7, 32)
    padded = torch.ones(2, 7, dtype=torch.long)
    padded[1, :3] = 0
    mask = create_causal_mask(config, embeds, padded, None, torch.arange(7)[None])
    assert mask.dtype == torch.bool and tuple(mask.shape) == (2, 7)
    assert torch.equal(mask, padded.bool())
    assert create_causal_mask(config, embeds, torch.ones(2, 7, dtype=torch.long), None, torch.arange(7)[None]) is None
    assert create_causal_mask(config, embeds, None, None, torch.arange(7)[None]) is None


def test_config_options_validate_and_round_trip(tmp_path):
    with pytest.raises(ValueError, match="temperature"):
        FastmaxConfig(temperature=0.0)
    with pytest.raises(ValueError, match="`p`"):
        FastmaxConfig(p=3)
    config = gpt2_config()
    stored = set_fastmax_config(config, temperature=2.5, a2=0.4)
    assert config.fastmax == stored.to_dict() and get_fastmax_config(config) == stored
    model = build(config)
    ids = prompts(1, 9)[0][None]
    expected = model(ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="fastmax", dtype=torch.float64)
    assert get_fastmax_config(reloaded.config) == stored
    assert reloaded.config._attn_implementation == "fastmax"
    assert torch.equal(reloaded.eval()(ids).logits, expected)


def test_unknown_option_in_config_is_refused():
    config = llama_config()
    config.fastmax = dict(config.fastmax, degree=3)
    with pytest.raises(ValueError, match="degree"):
        get_fastmax_config(config)


# ---------------------------------------------------------------------------------------------
# Logits against the definition
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_logits_equal_float64_definition(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    ids, mask = left_pad(prompts(2, 13, 8, 11))
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    fastmax_logits = model(**inputs).logits
    model.set_attn_implementation("fastmax_test_reference")
    try:
        expected = model(**inputs).logits
    finally:
        model.set_attn_implementation("fastmax")
    real = mask.bool()
    assert rel_err(fastmax_logits[real], expected[real]) < 1e-12


def test_gpt2_scaling_folds_in_layer_index(gpt2):
    # scale_attn_by_inverse_layer_idx: layer 1 scores are halved; the attention function must use
    # exactly the module's scaling, which the reference comparison above checks end to end.
    scalings = [block.attn.scaling for block in gpt2.transformer.h]
    assert scalings[1] == pytest.approx(scalings[0] / 2)


def test_packed_documents_equal_each_alone(llama, gpt2):
    docs = prompts(3, 6, 9, 4)
    packed = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(len(d)) for d in docs])[None]
    bounds = torch.tensor([0, 6, 15, 19], dtype=torch.int32)
    for model in (llama, gpt2):
        logits = model(input_ids=packed, position_ids=position_ids).logits[0]
        alone = torch.cat([model(input_ids=d[None]).logits[0] for d in docs])
        assert rel_err(logits, alone) < 1e-12
    # padding-free batches may carry the boundaries as cu_seq_lens (flash-attention style)
    logits = llama(input_ids=packed, position_ids=position_ids, cu_seq_lens_q=bounds, cu_seq_lens_k=bounds,
                   max_length_q=9, max_length_k=9).logits[0]
    assert rel_err(logits, torch.cat([llama(input_ids=d[None]).logits[0] for d in docs])) < 1e-12


def test_left_padded_rows_equal_each_alone(llama, gpt2):
    rows = prompts(4, 10, 4, 7)
    ids, mask = left_pad(rows)
    for model in (llama, gpt2):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        for i, row in enumerate(rows):
            assert rel_err(logits[i, -len(row):], model(input_ids=row[None]).logits[0]) < 1e-12


def test_left_padded_rows_equal_each_alone_with_normalize(llama, gpt2):
    """normalize=True: padded positions enter neither the keys' nor the queries' running maximum."""
    rows = prompts(5, 10, 4, 7)
    ids, mask = left_pad(rows)
    for model in (llama, gpt2):
        fastmax_hf.set_fastmax_config(model.config, normalize=True, lim=1.5)
        try:
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
            for i, row in enumerate(rows):
                assert rel_err(logits[i, -len(row):], model(input_ids=row[None]).logits[0]) < 1e-12
        finally:
            fastmax_hf.set_fastmax_config(model.config)


def test_dropout_only_in_training():
    model = build(llama_config(attention_dropout=0.3))
    ids = prompts(5, 8)[0][None]
    reference = build(llama_config())(ids).logits
    assert torch.equal(model(ids).logits, reference)  # eval: the module passes dropout=0
    model.train()
    torch.manual_seed(1)
    first = model(ids).logits
    second = model(ids).logits
    assert not torch.allclose(first, second) and not torch.allclose(first, reference)


def test_training_backward_accumulates_no_state(llama):
    model = build(llama_config())
    model.train()
    ids = prompts(6, 12)[0][None]
    first = model(ids, labels=ids, use_cache=False)
    first.loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert returned_cache(first) is None
    second = model(ids, labels=ids, use_cache=False)
    assert torch.equal(first.logits, second.logits)  # nothing carried between calls
    with pytest.raises(RuntimeError, match="does not propagate gradients"):
        model(ids, use_cache=True, **{CACHE_KWARG: FastmaxCache(config=model.config)})


def mistral_config(**overrides):
    config = MistralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, bos_token_id=1,
                           eos_token_id=2, pad_token_id=0, **overrides)
    set_fastmax_config(config, **OPTIONS)
    return config


def test_sliding_window_is_exact_within_the_window_and_refused_beyond():
    # Within the window a sliding layer attends to every previous token: fastmax is exact there.
    windowed, full = build(mistral_config(sliding_window=12)), build(mistral_config(sliding_window=None))
    ids = prompts(7, 6)[0][None]
    assert torch.equal(windowed(ids).logits, full(ids).logits)
    out = greedy(windowed, ids, 6, return_dict_in_generate=True)  # 12 positions: the whole window
    assert isinstance(returned_cache(out), FastmaxCache)
    assert torch.equal(out.sequences, greedy(full, ids, 6))
    # Beyond it: refused, naming the layer type and what to do, in the stateless and the cached path.
    for use_cache in (False, True):
        with pytest.raises(ValueError, match=r"layer type 'sliding_attention'.*sliding_window = None"):
            greedy(windowed, ids, 8, use_cache=use_cache)
    with pytest.raises(ValueError, match="sliding window of 4 tokens and this call covers 6 positions"):
        build(mistral_config(sliding_window=4))(ids)


def test_refuses_what_it_cannot_honour():
    model = build(llama_config())
    ids = prompts(7, 6)[0][None]
    custom_4d = torch.ones(1, 1, 6, 6, dtype=torch.bool).tril()
    with pytest.raises(ValueError, match="2-D"):
        model(ids, attention_mask=custom_4d)


# ---------------------------------------------------------------------------------------------
# Patches: other implementations untouched, clean revert
# ---------------------------------------------------------------------------------------------


def _sdpa_and_eager_outputs():
    outputs = []
    ids, mask = left_pad(prompts(8, 9, 5))
    for config in (llama_config(), gpt2_config()):
        for implementation in ("sdpa", "eager"):
            model = build(config, implementation, seed=3)
            logits = model(input_ids=ids, attention_mask=mask).logits
            tokens = greedy(model, ids, 4, attention_mask=mask)
            outputs.append((logits, tokens))
    return outputs


def test_sdpa_and_eager_are_bit_identical_with_and_without_patches():
    patched = _sdpa_and_eager_outputs()
    fastmax_hf.integration.disable()
    try:
        assert PreTrainedModel.get_correct_attn_implementation is not patches._get_correct_attn_implementation
        unpatched = _sdpa_and_eager_outputs()
    finally:
        fastmax_hf.integration.enable()
    for (logits_a, tokens_a), (logits_b, tokens_b) in zip(patched, unpatched):
        # bit for bit, NaNs included (sdpa's fully padded query rows)
        torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(tokens_a, tokens_b)


def test_patch_and_unpatch_revert_cleanly():
    from transformers.generation.utils import GenerationMixin

    resolution = PreTrainedModel.get_correct_attn_implementation
    prepare_cache = GenerationMixin._prepare_cache_for_generation
    assert resolution is patches._get_correct_attn_implementation
    assert prepare_cache is patches._prepare_cache_for_generation
    try:
        fastmax_hf.integration.disable()
        fastmax_hf.integration.disable()  # unpatching twice is harmless
        assert PreTrainedModel.__dict__["get_correct_attn_implementation"] is not resolution
        assert patches._ORIGINAL_RESOLUTION is patches._MISSING
        assert GenerationMixin._prepare_cache_for_generation is not prepare_cache
        # unpatched: fastmax options no longer choose the implementation, and generate keeps a DynamicCache
        assert build(llama_config(), None).config._attn_implementation == "sdpa"
        model = build(llama_config())
        out = model.generate(prompts(9, 5)[0][None], max_new_tokens=2, do_sample=False,
                             return_dict_in_generate=True, pad_token_id=0)
        assert isinstance(returned_cache(out), DynamicCache)
    finally:
        fastmax_hf.integration.enable()
        fastmax_hf.integration.enable()  # patching twice does not wrap the wrapper
    assert PreTrainedModel.get_correct_attn_implementation is resolution
    assert GenerationMixin._prepare_cache_for_generation is prepare_cache
    assert patches._ORIGINAL_RESOLUTION is not resolution


# ---------------------------------------------------------------------------------------------
# Reloading a converted model; families that cannot work
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_of", [llama_config, gpt2_config])
def test_saved_fastmax_model_reloads_as_fastmax_unless_told_otherwise(tmp_path, config_of):
    model = build(config_of())
    model.save_pretrained(tmp_path)
    ids, mask = left_pad(prompts(22, 7, 4))
    expected = model(input_ids=ids, attention_mask=mask).logits

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()  # no attn_implementation
    assert reloaded.config._attn_implementation == "fastmax"
    # equal to rounding (the reloaded model's rotary frequencies are computed afresh)
    assert rel_err(reloaded(input_ids=ids, attention_mask=mask).logits, expected) < 1e-12
    out = greedy(reloaded, ids, 6, attention_mask=mask, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), FastmaxCache)
    assert torch.equal(out.sequences, greedy(model, ids, 6, attention_mask=mask))

    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="sdpa").eval()
    assert sdpa.config._attn_implementation == "sdpa"
    sdpa_logits = sdpa(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()  # sdpa's fully padded query rows aside
    assert (sdpa_logits - expected)[real].abs().max() > 1e-3  # the same weights, another attention


def test_model_card_says_how_to_load_and_its_snippet_loads_fastmax(tmp_path):
    import re

    model = build(llama_config())
    model.save_pretrained(tmp_path)
    card = fastmax_hf.integration.model_card(model.config)
    assert "| `temperature` | `1.3` |" in card and "attn_implementation=\"sdpa\"" in card
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    namespace = {"path": tmp_path}
    exec(snippet, namespace)
    assert namespace["model"].config._attn_implementation == "fastmax"
    plain = llama_config()
    del plain.fastmax
    assert "without fastmax options" in fastmax_hf.integration.model_card(plain)


def test_config_without_fastmax_options_keeps_transformers_default():
    config = llama_config()
    del config.fastmax
    assert build(config, None).config._attn_implementation == "sdpa"
    assert build(llama_config(), "eager").config._attn_implementation == "eager"  # an explicit name wins


def test_family_with_its_own_attention_dispatch_is_refused_by_name():
    # Bloom computes attention itself in every transformers release here (Falcon did until 5.24;
    # 5.25 moved it onto the attention interface)
    bloom = BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    with pytest.raises(FastmaxUnsupportedError, match=r"model family 'bloom' \(BloomForCausalLM\)"):
        AutoModelForCausalLM.from_config(copy.deepcopy(bloom), attn_implementation="fastmax")
    set_fastmax_config(bloom)  # options in the config: refused too, rather than quietly loaded as sdpa
    with pytest.raises(FastmaxUnsupportedError, match="own implementation"):
        AutoModelForCausalLM.from_config(copy.deepcopy(bloom))
    assert build(bloom, "eager").config._attn_implementation == "eager"  # its own attention, as named


def test_a_config_asking_for_a_score_bias_is_refused_with_the_change_that_converts_it():
    """Falcon with ALiBi adds a bias to every score (through the attention mask, which fastmax does
    not build): refused at from_config, naming the attribute and the value that converts the model
    (before this check, an AttributeError deep inside Falcon's forward under transformers 5.25)."""
    from transformers import FalconConfig

    falcon = FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True)
    if not fastmax_hf.integration.patches._dispatches_through_interface(
            AutoModelForCausalLM._model_mapping[type(falcon)]):
        pytest.skip("this transformers' Falcon computes attention itself (refused for that reason)")
    with pytest.raises(FastmaxUnsupportedError, match=r"'falcon'.*`config.alibi = True`.*ALiBi.*`config.alibi = False`") as err:
        AutoModelForCausalLM.from_config(copy.deepcopy(falcon), attn_implementation="fastmax")
    assert err.value.fix == {"alibi": False}
    falcon.alibi = False
    model = build(falcon, "fastmax")
    ids = prompts(9, 5)[0][None]
    assert torch.equal(greedy(model, ids, 6), greedy(model, ids, 6, use_cache=False))


# ---------------------------------------------------------------------------------------------
# Generation from the recurrent state
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cached_greedy_equals_recomputation(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    ids = prompts(10, 7)[0][None]
    out = greedy(model, ids, 24, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), FastmaxCache)
    assert torch.equal(out.sequences, greedy(model, ids, 24, use_cache=False))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_beam_search_equals_recomputation(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    ids = prompts(11, 6)[0][None]
    kwargs = dict(num_beams=3, num_return_sequences=3, early_stopping=False, length_penalty=0.0)
    cached = greedy(model, ids, 10, **kwargs)
    assert torch.equal(cached, greedy(model, ids, 10, use_cache=False, **kwargs))


@pytest.mark.parametrize("options", [dict(normalize=True, lim=1.5), dict(p=1, normalize=True, lim=1.0)])
def test_cached_greedy_equals_recomputation_with_options(options):
    # normalize: the state carries the running maxima of ||q|| and ||k||, as the causal pass uses
    model = build(llama_config())
    set_fastmax_config(model.config, **OPTIONS, **options)
    ids = prompts(20, 7)[0][None]
    out = greedy(model, ids, 16, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), FastmaxCache)
    assert torch.equal(out.sequences, greedy(model, ids, 16, use_cache=False))


def test_vanishing_kernel_is_refused_by_the_state():
    model = build(llama_config())
    set_fastmax_config(model.config, p=1)  # 1 + s reaches 0 for s = -1: the state cannot check it
    with pytest.raises(ValueError, match="can reach 0"):
        greedy(model, prompts(21, 5)[0][None], 3)


def test_sampling_equals_recomputation(llama):
    ids = prompts(12, 6)[0][None]
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(5)
        runs.append(llama.generate(ids, max_new_tokens=12, do_sample=True, top_k=0, num_return_sequences=2,
                                   use_cache=use_cache, pad_token_id=0))
    assert torch.equal(runs[0], runs[1])


class _CacheBytes(LogitsProcessor):
    """Records the cache's bytes after every forward of generate()."""

    def __init__(self, cache):
        self.cache, self.sizes = cache, []

    def __call__(self, input_ids, scores):
        self.sizes.append(self.cache.nbytes())
        return scores


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_cache_bytes_do_not_grow(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    ids = prompts(13, 5)[0][None]
    cache = FastmaxCache(config=model.config)
    recorder = _CacheBytes(cache)
    greedy(model, ids, 30, logits_processor=LogitsProcessorList([recorder]), **{CACHE_KWARG: cache})
    config = model.config
    head_dim = config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", config.num_attention_heads)
    F = feature_count(head_dim, 2)
    expected = config.num_hidden_layers * kv_heads * (F * head_dim + F) * 8  # float64 state of one sequence
    assert recorder.sizes == [expected] * 30
    assert cache.get_seq_length() == 5 + 29  # the last token is sampled, not yet folded in


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padded_generation_equals_each_alone(family, llama, gpt2):
    model = llama if family == "llama" else gpt2
    rows = prompts(14, 9, 4, 6)
    ids, mask = left_pad(rows)
    out = greedy(model, ids, 12, attention_mask=mask, return_dict_in_generate=True)
    batch_state = returned_cache(out).layers[0].state
    for i, row in enumerate(rows):
        alone = greedy(model, row[None], 12, return_dict_in_generate=True)
        assert torch.equal(out.sequences[i, ids.shape[1]:], alone.sequences[0, len(row):])
        # padded keys never entered the state: row i's state is the state of the row alone
        alone_state = returned_cache(alone).layers[0].state
        assert rel_err(batch_state.S[i], alone_state.S[0]) < 1e-12
        assert rel_err(batch_state.z[i], alone_state.z[0]) < 1e-12


def test_prefill_in_chunks_then_decode(llama):
    ids = prompts(15, 11)[0][None]
    cache = FastmaxCache(config=llama.config)
    first = llama(ids[:, :6], use_cache=True, **{CACHE_KWARG: cache}).logits
    second = llama(ids[:, 6:], use_cache=True, **{CACHE_KWARG: cache}).logits
    full = llama(ids, use_cache=False).logits
    assert rel_err(torch.cat([first, second], dim=1), full) < 1e-12
    assert cache.get_seq_length() == 11


@pytest.mark.parametrize("config_class", [MistralConfig, Qwen2Config, Qwen3Config])
def test_other_patched_families_generate_exactly(config_class):
    head_dim = dict(head_dim=8) if config_class is Qwen3Config else {}
    config = config_class(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, sliding_window=None,
                          bos_token_id=1, eos_token_id=2, pad_token_id=0, **head_dim)
    set_fastmax_config(config, **OPTIONS)
    model = build(config)
    ids = prompts(16, 6)[0][None]
    out = greedy(model, ids, 10, return_dict_in_generate=True)
    assert isinstance(returned_cache(out), FastmaxCache)
    assert torch.equal(out.sequences, greedy(model, ids, 10, use_cache=False))


def test_kv_cache_family_keeps_the_kv_cache_with_one_warning():
    config = DiffLlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2, bos_token_id=1,
                             eos_token_id=2, pad_token_id=0)
    set_fastmax_config(config, **OPTIONS)
    model = build(config)
    ids = prompts(17, 6)[0][None]
    notices.WARNED.discard("kv-cache:diffllama")
    with pytest.warns(UserWarning, match="keeps transformers' key/value cache for 'diffllama'"):
        cached = greedy(model, ids, 10, return_dict_in_generate=True)
    assert type(returned_cache(cached)) is DynamicCache
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(model, ids, 2)  # warned once only
    assert torch.equal(cached.sequences, greedy(model, ids, 10, use_cache=False))


def test_generation_refusals(llama):
    ids = prompts(18, 5)[0][None]
    with pytest.raises(ValueError, match="cache_implementation='offloaded_static'.*'static'"):
        greedy(llama, ids, 3, cache_implementation="offloaded_static")
    with pytest.raises(ValueError, match="assisted decoding"):
        greedy(llama, ids, 3, prompt_lookup_num_tokens=2)
    cache = FastmaxCache(config=llama.config)
    llama(ids, use_cache=True, **{CACHE_KWARG: cache})
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    cache.crop(0)  # removing nothing is allowed
    # update() hands the layer over to the attention call that follows; a second update before it is refused
    key = torch.zeros(1, 2, 1, 8, dtype=torch.float64)
    assert cache.update(key, key, 0)[0] is key
    with pytest.raises(RuntimeError, match="was not followed by a fastmax attention call"):
        cache.update(key, key, 1)
    sdpa_model = build(llama_config(), "sdpa")
    with pytest.raises(RuntimeError, match="not keys and values"):
        sdpa_model(ids, use_cache=True, **{CACHE_KWARG: FastmaxCache(config=sdpa_model.config)})


def test_hand_over_refuses_what_the_state_cannot_follow(llama):
    from fastmax_hf.integration import cache as cache_module

    # An attention implementation that is not fastmax never takes the hand-over: the next update refuses.
    sdpa_model = build(llama_config(), "sdpa")
    with pytest.raises(RuntimeError, match="layer 0's update\\(\\) was not followed by a fastmax attention call"):
        sdpa_model(prompts(23, 5)[0][None], use_cache=True, **{CACHE_KWARG: FastmaxCache()})  # no config to check
    # Keys/values of other tokens than update() was given: refused.
    cache = FastmaxCache(config=llama.config)
    key = torch.zeros(1, 2, 3, 8, dtype=torch.float64)
    cache.update(key, key, 0)
    module = llama.model.layers[0].self_attn
    with pytest.raises(RuntimeError, match="changes which tokens attention sees"):
        fastmax_hf.integration.fastmax_attention_forward(module, torch.zeros(1, 4, 2, 8, dtype=torch.float64),
                                                         key[:, :, 1:], key[:, :, 1:], None, scaling=0.3)
    # A hand-over left by another cache (an exception between its update and attention) is replaced.
    cache.update(key, key, 0)
    other = FastmaxCache(config=llama.config)
    other.update(key, key, 1)
    assert cache_module.take_hand_over(1, key, key) is other.layers[1]


def test_cache_batch_operations(llama):
    ids, mask = left_pad(prompts(19, 5, 3))
    cache = FastmaxCache(config=llama.config)
    llama(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True,
          **{CACHE_KWARG: cache})
    S = cache.layers[1].state.S.clone()
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[1].state.S, S.flip(0))
    cache.batch_repeat_interleave(2)
    assert torch.equal(cache.layers[1].state.S, S.flip(0).repeat_interleave(2, dim=0))
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(cache.layers[1].state.S, S.flip(0))
    assert cache.get_mask_sizes(1, 0) == (6, 0) and cache.get_max_length() == -1
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.nbytes() == 0
