"""A model built or switched to fastmax without explicit options still reloads as fastmax.

transformers does not save the attention implementation; fastmax_hf writes its default options
into the config the first time a model resolves to fastmax, so that save_pretrained records them
(issue 16, item 1). Qwen2 here (grouped-query heads, the integration tests use Llama), with
weights scaled up so that fastmax and softmax give visibly different logits.
"""

import copy

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

import fastmax_hf  # noqa: F401  (registers attn_implementation="fastmax")
from fastmax_hf.integration.config import CONFIG_ATTRIBUTE

CONFIG = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.4)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_a_model_built_with_fastmax_and_saved_reloads_as_fastmax(tmp_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="fastmax").eval()
    assert getattr(model.config, CONFIG_ATTRIBUTE) is not None  # the defaults were recorded
    model.save_pretrained(tmp_path)
    ids = torch.randint(0, 97, (2, 19))

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "fastmax"
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)

    softmax = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert softmax.config._attn_implementation == "sdpa"
    assert (_logits(softmax, ids) - _logits(model, ids)).abs().max() > 1e-2  # a different function


def test_a_model_switched_to_fastmax_records_the_options(tmp_path):
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="sdpa").eval()
    assert getattr(model.config, CONFIG_ATTRIBUTE, None) is None
    model.set_attn_implementation("fastmax")
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config._attn_implementation == "fastmax"
    ids = torch.randint(0, 97, (1, 11))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
