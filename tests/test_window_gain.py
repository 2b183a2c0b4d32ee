"""Learnable per-head window gains (fastmax_hf.integration.window_gain): parameters while training,
numbers in config.json after, the same function before and after storing, saved and reloaded,
cached generation equal to recomputation with per-layer gains, and clear errors."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import fastmax_hf
from fastmax_hf.integration import FastmaxConfig, learn_window_gains, store_window_gains
from fastmax_hf.integration.window_gain import PARAMETER


def tiny_config(window=8, **options):
    config = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=1)
    fastmax_hf.set_fastmax_config(config, window=window, **options)
    return config


def tiny_model(config, seed=0):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="fastmax").double().eval()


def set_gains(parameters, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in parameters:
            p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def test_learning_starts_from_the_configured_gain_and_gets_gradients():
    model = tiny_model(tiny_config(window_gain=0.7))
    ids = torch.randint(2, 97, (2, 41))
    before = model(ids).logits
    parameters = learn_window_gains(model)
    assert len(parameters) == 3 and all(p.shape == (6,) for p in parameters)
    assert all(torch.allclose(p.exp(), torch.full((6,), 0.7, dtype=p.dtype)) for p in parameters)
    torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=1e-12)
    model(ids).logits.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().min() > 0 for p in parameters)  # every head of every layer


def test_storing_keeps_the_function_and_reloads_as_fastmax(tmp_path):
    model = tiny_model(tiny_config())
    set_gains(learn_window_gains(model))
    ids = torch.randint(2, 97, (2, 37))
    learned = model(ids).logits
    gains = store_window_gains(model)
    assert not any(PARAMETER in name for name, _ in model.named_parameters())
    assert len(gains) == 3 and all(len(g) == 6 for g in gains) and len({round(g, 6) for g in sum(gains, [])}) == 18
    assert model.config.fastmax["window_gain"] == gains
    torch.testing.assert_close(model(ids).logits, learned, rtol=0, atol=1e-12)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert reloaded.config._attn_implementation == "fastmax"
    torch.testing.assert_close(reloaded(ids).logits, learned, rtol=0, atol=1e-12)
    # the gains matter: the same weights with gain 1 everywhere compute something else
    plain = copy.deepcopy(reloaded)
    fastmax_hf.set_fastmax_config(plain.config, get_config(plain), window_gain=1.0)
    assert (plain(ids).logits - learned).abs().max() > 1e-3


def get_config(model):
    return fastmax_hf.get_fastmax_config(model.config)


def test_learning_continues_from_stored_gains():
    model = tiny_model(tiny_config())
    set_gains(learn_window_gains(model))
    gains = store_window_gains(model)
    again = learn_window_gains(model)
    for p, g in zip(again, gains):
        torch.testing.assert_close(p.exp(), torch.tensor(g, dtype=p.dtype), rtol=1e-6, atol=0)


@pytest.mark.parametrize("do_sample", [False, True])
def test_cached_generation_with_per_layer_gains_equals_recomputation(do_sample):
    model = tiny_model(tiny_config())
    set_gains(learn_window_gains(model))
    store_window_gains(model)
    prompt = torch.randint(2, 97, (2, 11))
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0  # left padding in the second row
    torch.manual_seed(5)
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=24, do_sample=do_sample, eos_token_id=None,
                         output_scores=True, return_dict_in_generate=True)
    full_mask = torch.cat([mask, torch.ones(2, 24, dtype=mask.dtype)], dim=1)
    logits = model(out.sequences, attention_mask=full_mask).logits[:, 10:-1]  # (2, 24, V)
    cached = torch.stack(out.scores, dim=1) if not do_sample else None
    if cached is not None:
        torch.testing.assert_close(cached.double(), logits, rtol=1e-5, atol=1e-5)  # scores come back in float32
    else:  # sampled tokens: each step's logits from the state equal the full pass's
        step = model(out.sequences[:, :-1], attention_mask=full_mask[:, :-1]).logits[:, 10:]
        torch.testing.assert_close(step, logits, rtol=1e-9, atol=1e-9)


def test_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="no hybrid window"):
        learn_window_gains(tiny_model(tiny_config(window=None)))
    with pytest.raises(ValueError, match="positive finite number, layer 1 holds -1"):
        FastmaxConfig(window=4, window_gain=[[1.0, 2.0], [-1.0, 1.0]])
    with pytest.raises(TypeError, match="layer 0 must hold a non-empty list"):
        FastmaxConfig(window=4, window_gain=[[]])
    with pytest.raises(TypeError, match="must be a positive number or a list"):
        FastmaxConfig(window=4, window_gain="big")
    wrong_heads = tiny_config(window_gain=[[1.0] * 5] * 3)
    with pytest.raises(ValueError, match="layer 0 has 5 gains, but the layer has 6 query heads"):
        tiny_model(wrong_heads)(torch.randint(2, 97, (1, 9)))
    too_few_layers = tiny_config(window_gain=[[1.0] * 6] * 2)
    with pytest.raises(ValueError, match="gains for 2 layers; an attention layer with layer_idx=2 has none"):
        tiny_model(too_few_layers)(torch.randint(2, 97, (1, 9)))


def test_stored_gains_are_not_read_back_on_every_call(monkeypatch):
    # a config's per-layer gains are checked when parsed; reading a tensor's values back per attention
    # call would be a device synchronisation on every decoding step of every layer
    from fastmax_hf import validation

    config = FastmaxConfig(window=4, window_gain=[[1.0, 2.0, 0.5]])
    gains = config.window_gain_of_layer(0, 3, "cpu")
    assert config.window_gain_of_layer(0, 3, "cpu") is gains  # made once per layer and device
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda self: pytest.fail("the gains' values were read back"))
    validation.check_window_gain_tensor(gains, 3, gains.device)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="positive and finite in every head"):  # any other tensor still is checked
        validation.check_window_gain_tensor(torch.tensor([1.0, -2.0, 1.0]), 3, torch.device("cpu"))
