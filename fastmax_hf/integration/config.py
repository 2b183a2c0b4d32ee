"""Fastmax options stored in a model's config, so that a saved model reloads with the same function.

    config = AutoConfig.from_pretrained(name)
    fastmax_hf.set_fastmax_config(config, p=2, temperature=2.0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fastmax")
    model.save_pretrained(path)     # config.json now holds "fastmax": {...}

The options live in ``config.fastmax`` as a plain dict: ``PreTrainedConfig`` writes unknown
attributes to config.json and reads them back, so they survive save_pretrained /
from_pretrained with no custom config class. transformers does not save ``config._attn_implementation``;
with fastmax_hf imported, a config that carries these options loads as fastmax unless the caller
names another implementation (``patches.patch_attn_resolution``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from ..backends import check_backend
from ..options import FastmaxOptions, default_scale
from ..validation import (
    check_finite_number,
    check_kernel_options,
    check_window,
    check_window_gain,
    mark_window_gain_checked,
)

CONFIG_ATTRIBUTE = "fastmax"


@dataclass(frozen=True)
class FastmaxConfig:
    """The kernel f(s) = a0 + a1 s (+ a2 s^2 for p = 2) and how its scores are formed.

    Attributes:
        p: 2 (default, the 2nd-order Taylor expansion of exp) or 1.
        a0, a1, a2: the kernel's coefficients.
        temperature: s_ij = q_i . k_j * scaling / temperature, where ``scaling`` is what the model
            passes to its attention function (1/sqrt(head_dim) for Llama; GPT-2 folds its
            per-layer factor in).
        normalize, lim: scale q and k by lim / (running) max ||x|| so that |s| stays bounded
            (see ``fastmax_hf.fastmax``); under a causal mask the maximum runs over past tokens only.
        backend: forwarded to ``fastmax_hf.fastmax`` ("auto", "reference", "chunked", "triton";
            see ``fastmax_hf.backends``); the recurrent state takes "reference" as "chunked".
        window: None, or W: the hybrid window of ``fastmax_hf.fastmax`` (exact softmax over the
            last W positions, fastmax over the earlier ones; causal layers only). The generation
            cache then keeps the last W positions' keys and values per layer beside the state.
            Runs on the Triton kernels too; its recurrent step stays on PyTorch.
        window_gain: gamma, the weight of the fastmax part: a positive number (1.0 by default), or
            one gain per query head of every layer, ``window_gain[layer_idx][head]`` (a tuple of
            tuples; config.json holds it as a list of lists), as ``fastmax_hf.integration.window_gain``
            learns and stores them.

    ``options_for`` gives the ``FastmaxOptions`` of an attention call.
    """

    p: int = 2
    a0: float = 1.0
    a1: float = 1.0
    a2: float = 0.5
    temperature: float = 1.0
    normalize: bool = False
    lim: float = 1.0
    backend: str = "auto"
    window: int | None = None
    window_gain: float | tuple[tuple[float, ...], ...] = 1.0

    def __post_init__(self):
        check_kernel_options(p=self.p, a0=self.a0, a1=self.a1, a2=self.a2, normalize=self.normalize, lim=self.lim)
        check_finite_number("temperature", self.temperature)
        if self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}")
        check_backend(self.backend)
        check_window(self.window)
        if isinstance(self.window_gain, (list, tuple)):
            # config.json holds numbers: one list of per-head gains per layer, kept as tuples (hashable)
            layers = tuple(_gains_of_layer(i, gains) for i, gains in enumerate(self.window_gain))
            if not layers:
                raise ValueError("`window_gain` per layer must name at least one layer")
            object.__setattr__(self, "window_gain", layers)
        elif not isinstance(self.window_gain, (int, float)) or isinstance(self.window_gain, bool):
            raise TypeError("`window_gain` in a FastmaxConfig must be a positive number or a list (per layer) "
                            f"of lists (per query head) of positive numbers, got {self.window_gain!r}")
        else:
            check_window_gain(self.window_gain)

    def window_gain_of_layer(self, layer_idx: int | None, heads_q: int, device) -> float | torch.Tensor:
        """``window_gain`` for one layer's call: the number, or that layer's (Hq,) float64 gains on ``device``."""
        if not isinstance(self.window_gain, tuple):
            return float(self.window_gain)
        if not isinstance(layer_idx, int) or not 0 <= layer_idx < len(self.window_gain):
            raise ValueError(f"`window_gain` holds gains for {len(self.window_gain)} layers; an attention layer "
                             f"with layer_idx={layer_idx!r} has none")
        gains = self.window_gain[layer_idx]
        if len(gains) != heads_q:
            raise ValueError(f"`window_gain` of layer {layer_idx} has {len(gains)} gains, but the layer has {heads_q} query heads")
        return _gain_tensor(gains, str(device))

    def options_for(self, scaling: float | None, head_dim: int, layer_idx: int | None = None,
                    heads_q: int | None = None, device=None) -> FastmaxOptions:
        """The kernel's options for an attention call: s = q . k * scaling / temperature.

        ``scaling`` is what the model passes to its attention function; None means
        ``default_scale(head_dim)`` (1/sqrt(head_dim)). ``layer_idx``, ``heads_q`` and ``device``
        pick a layer's gains when ``window_gain`` holds one list per layer."""
        model_scale = default_scale(head_dim) if scaling is None else scaling
        gain = self.window_gain_of_layer(layer_idx, heads_q, device)
        return FastmaxOptions(scale=float(model_scale / self.temperature), p=self.p, a0=self.a0, a1=self.a1,
                              a2=self.a2, normalize=self.normalize, lim=self.lim, window=self.window,
                              window_gain=gain)

    def to_dict(self) -> dict:
        options = dataclasses.asdict(self)
        if isinstance(self.window_gain, tuple):  # JSON has lists
            options["window_gain"] = [list(gains) for gains in self.window_gain]
        return options

    @classmethod
    def from_dict(cls, options: dict) -> "FastmaxConfig":
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown fastmax option(s) {unknown} in the model config; known options: {sorted(known)}")
        return cls(**options)


def _gains_of_layer(layer_idx: int, gains) -> tuple[float, ...]:
    if not isinstance(gains, (list, tuple)) or not gains:
        raise TypeError(f"`window_gain` per layer: layer {layer_idx} must hold a non-empty list of per-head gains, "
                        f"got {gains!r}")
    for gain in gains:
        if not isinstance(gain, (int, float)) or isinstance(gain, bool) or not math.isfinite(gain) or gain <= 0:
            raise ValueError(f"`window_gain` per layer: every gain must be a positive finite number, "
                             f"layer {layer_idx} holds {gain!r}")
    return tuple(float(g) for g in gains)


@functools.lru_cache(maxsize=1024)
def _gain_tensor(gains: tuple[float, ...], device: str) -> torch.Tensor:
    # one small tensor per (layer, device), made once: every attention call reads it (made outside
    # inference mode, so that one first made during generation can still be saved for backward)
    with torch.inference_mode(False):  # exact; cast to the kernel's dtype per call; values checked in _gains_of_layer
        return mark_window_gain_checked(torch.tensor(gains, dtype=torch.float64, device=device))


def set_fastmax_config(config, fastmax_config: FastmaxConfig | None = None, **options) -> FastmaxConfig:
    """Store Fastmax options in ``config`` (a ``PreTrainedConfig``) as ``config.fastmax = {...}``.

    Args:
        config: the model's config (for composite models, the text config whose attention is converted).
        fastmax_config: a complete ``FastmaxConfig``; keyword ``options`` override its fields (or the
            defaults when it is None), e.g. ``set_fastmax_config(config, temperature=2.0)``.

    Returns:
        The ``FastmaxConfig`` stored. A model built or loaded from ``config`` without an explicit
        ``attn_implementation`` then uses "fastmax"; an existing model switches with
        ``model.set_attn_implementation("fastmax")``.
    """
    base = fastmax_config if fastmax_config is not None else FastmaxConfig()
    resolved = dataclasses.replace(base, **options)
    setattr(config, CONFIG_ATTRIBUTE, resolved.to_dict())
    return resolved


def get_fastmax_config(config) -> FastmaxConfig:
    """The Fastmax options of ``config``, or the defaults when it has none."""
    options = getattr(config, CONFIG_ATTRIBUTE, None)
    if options is None:
        return FastmaxConfig()
    if isinstance(options, FastmaxConfig):
        return options
    if not isinstance(options, dict):
        raise TypeError(f"`config.{CONFIG_ATTRIBUTE}` must be a dict of fastmax options, got {type(options).__name__}")
    items = tuple(sorted((key, _frozen(value)) for key, value in options.items()))
    try:
        hash(items)
    except TypeError:
        return FastmaxConfig.from_dict(options)  # an unhashable value: let validation name it
    return _parse_options(items)


def _frozen(value):
    """Lists (config.json's per-layer window gains) as tuples, so that the options can key a cache."""
    return tuple(_frozen(v) for v in value) if isinstance(value, list) else value


@functools.lru_cache(maxsize=64)
def _parse_options(items: tuple) -> FastmaxConfig:
    # Every attention call reads the options: parse and validate each distinct dict once.
    return FastmaxConfig.from_dict(dict(items))


def model_card(config, title: str | None = None) -> str:
    """A README.md (model card) for a model saved with ``config``: what it is and how to load it.

    ``scripts/finetune.py`` writes it beside the saved model."""
    text_config = config.get_text_config(decoder=True)
    options = getattr(text_config, CONFIG_ATTRIBUTE, None)
    name = title or getattr(config, "_name_or_path", None) or type(config).__name__.removesuffix("Config")
    if options is None:
        return (
            f"# {name}\n\nA `{config.model_type}` model without fastmax options (softmax attention): load it with "
            "`AutoModelForCausalLM.from_pretrained(path)`.\n"
        )
    listed = "\n".join(f"| `{key}` | `{value!r}` |" for key, value in FastmaxConfig.from_dict(options).to_dict().items())
    return f"""# {name}

A `{config.model_type}` model with **Fastmax attention** (polynomial-kernel linear attention, from the
`fastmax_hf` package); its options are in `config.json` under `"fastmax"`.

## Loading

```python
import fastmax_hf                      # registers attn_implementation="fastmax"
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained(path)    # fastmax: the config carries its options
```

`import fastmax_hf` must come first: without it transformers loads the weights with softmax
attention (sdpa), which is not the function the model was trained with. Naming another
implementation (`from_pretrained(path, attn_implementation="sdpa")`) loads that one instead.
`generate()` keeps a constant-size recurrent state (`fastmax_hf.FastmaxCache`) instead of a
key/value cache.

## Fastmax options

| option | value |
|---|---|
{listed}
"""
