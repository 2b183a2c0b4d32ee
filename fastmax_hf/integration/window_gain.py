"""Learnable per-head gains of the hybrid window, kept in the model's config once learned.

The hybrid window (``fastmax(..., window=W, window_gain=gamma)``) weighs the keys before the last W
positions by gamma * f(s). With one gamma per query head and layer a head can turn its polynomial
part down (or up) against its softmax window. During training each attention layer holds the
parameter ``fastmax_log_window_gain`` (Hq,): the log of its gains, so that no optimizer step
makes a gain negative. ``store_window_gains`` writes the gains into ``config.fastmax["window_gain"]``
(one list per layer) and removes the parameters: the saved model is a plain transformers
model, config.json carries the gains, and ``from_pretrained`` gives them back.

    learn_window_gains(model)             # parameters on every attention layer, from the config's gains
    ...train (they are in model.parameters())...
    store_window_gains(model)             # into model.config.fastmax; the parameters are gone
    model.save_pretrained(path)
"""

from __future__ import annotations

import torch
from torch import nn

from .config import get_fastmax_config, set_fastmax_config

PARAMETER = "fastmax_log_window_gain"


def learned_window_gain(module: nn.Module) -> torch.Tensor | None:
    """The gains (Hq,) an attention layer is learning, or None."""
    log_gain = getattr(module, PARAMETER, None)
    return None if log_gain is None else log_gain.exp()


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The attention modules of ``model`` in layer order: modules with an integer ``layer_idx``
    and a ``head_dim`` (every family transformers dispatches through ALL_ATTENTION_FUNCTIONS)."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int) and hasattr(m, "head_dim")]
    return sorted(layers, key=lambda m: m.layer_idx)


def _query_heads(module: nn.Module, config) -> int:
    heads = getattr(module, "num_heads", None) or getattr(config, "num_attention_heads", None)
    if not isinstance(heads, int):
        raise ValueError(f"cannot tell how many query heads {type(module).__name__} has")
    return heads


def learn_window_gains(model: nn.Module) -> list[nn.Parameter]:
    """Give every attention layer a learnable log-gain per query head, initialised from the
    config's ``window_gain`` (a number, or gains per layer). Returns the new parameters (add them
    to the optimizer). The model must have the hybrid window (``window`` set in its fastmax options)."""
    config = model.config.get_text_config(decoder=True)
    options = get_fastmax_config(config)
    if options.window is None:
        raise ValueError("learn_window_gains: the model has no hybrid window (set_fastmax_config(config, window=W))")
    layers = attention_layers(model)
    if not layers:
        raise ValueError(f"learn_window_gains: found no attention layers (modules with layer_idx) in {type(model).__name__}")
    parameters = []
    for module in layers:
        heads = _query_heads(module, config)
        weight = next(module.parameters())
        start = options.window_gain_of_layer(module.layer_idx, heads, weight.device)
        # float32 (a gain in bf16 would move in steps of 1/128), float64 for a float64 model
        dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        start = torch.as_tensor(start, dtype=dtype, device=weight.device).expand(heads)
        parameter = nn.Parameter(start.log().clone())
        module.register_parameter(PARAMETER, parameter)
        parameters.append(parameter)
    return parameters


@torch.no_grad()
def store_window_gains(model: nn.Module) -> list[list[float]]:
    """Write the learned gains into ``model.config``'s fastmax options (``window_gain``: one list per
    layer) and remove the parameters. Returns the gains. Layers without learned gains keep the
    config's (a number becomes that number in every head)."""
    config = model.config.get_text_config(decoder=True)
    options = get_fastmax_config(config)
    layers = attention_layers(model)
    gains = []
    for index, module in enumerate(layers):
        if module.layer_idx != index:
            raise ValueError(f"store_window_gains: attention layers are not numbered 0..{len(layers) - 1}")
        learned = learned_window_gain(module)
        if learned is None:
            heads = _query_heads(module, config)
            learned = torch.as_tensor(options.window_gain_of_layer(index, heads, "cpu")).expand(heads)
        gains.append([float(g) for g in learned.double().cpu()])
        if hasattr(module, PARAMETER):
            delattr(module, PARAMETER)
    set_fastmax_config(config, options, window_gain=gains)
    return gains
