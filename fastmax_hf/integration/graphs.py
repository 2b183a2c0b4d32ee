"""CUDA-graph replay of fastmax decoding steps: ``generate(..., cache_implementation="static")``.

Decoding one token through a model is hundreds of small kernel launches, and at batch 1 the
host that issues them, not the GPU, sets the pace. A fastmax model's state has one size from
the first token on, so with a static ``FastmaxCache`` (the state folded in place, nothing read
back to the host) a whole decoding step can be captured once as a CUDA graph and replayed:
one launch a step.

transformers' generate() takes its static-shape path for a cache that says it is compileable:
it asks the model for ``get_compiled_call(compile_config)`` and calls that for every decoding
step. For fastmax models ``patches.py`` answers with a ``DecodeGraphRunner`` instead of
``torch.compile``: it replays captured graphs of the eager step (the compile config's
backend and mode are not used).

A call is replayed when it is a one-token step (``input_ids`` (B, 1), no ``inputs_embeds``,
no gradient) on a static ``FastmaxCache`` whose every layer is a ``FastmaxCacheLayer`` holding
a CUDA state (the prompt folded in; a hybrid window's tail at its full W positions); any other
call runs the model
as it is. For the first such call on a cache:

1. The step's tensor inputs get static buffers. ``position_ids`` are always among them (filled
   from the cache's length where the call has none): a model left to itself computes them
   from a Python int, which a graph would freeze. The growing attention mask is not an input:
   a step needs only its last column (is each row's new token real), which goes to the
   layers' ``decode_valid`` buffer.
2. Warm-up: the step runs once eagerly with every new token marked padding, so every kernel
   is compiled and the state is untouched (a padded token joins nothing, by selection; but it
   is a position, so the states of hybrid-window layers, whose tails it moves, are copied
   before and put back).
3. Capture, then a check: at the next position, again with padded tokens, the replay must give
   the eager step's logits. A model whose graph froze something that changes from step to step
   fails it; it then decodes eagerly, with a warning.

After each replay the runner advances what the forward would have advanced in Python: every
layer's ``seen_tokens``. The replayed outputs are copied out of the graph's buffers.
"""

from __future__ import annotations

import inspect
import time

import torch

from ..notices import warn_once
from .cache import FastmaxCache, FastmaxCacheLayer

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def _cache_of(kwargs: dict):
    for name in CACHE_ARGUMENT_NAMES:
        if kwargs.get(name) is not None:
            return name, kwargs[name]
    return None, None


def _replayable_cache(cache) -> bool:
    """A static FastmaxCache whose layers are all fastmax layers with a CUDA state (a hybrid
    window's tail at its full length W, as static layers keep it)."""
    if not isinstance(cache, FastmaxCache) or not cache.static or not cache.layers:
        return False
    for layer in cache.layers:
        if type(layer) is not FastmaxCacheLayer or layer.state is None:
            return False
        if layer.state.window is not None and layer.state.tail_k.shape[2] != layer.state.window:
            return False
        if layer.state.S.device.type != "cuda":
            return False
    return True


def _padding_mask(mask):
    """The (B, N) padding mask of a step's ``attention_mask``, None without one, False when the
    step cannot be replayed. generate() may hand a dict of masks by layer type (Qwen2 under
    transformers 5.17): fastmax's mask function gives every type the same 2-D padding mask."""
    masks = list(mask.values()) if isinstance(mask, dict) else [mask]
    tensors = [m for m in masks if m is not None]
    if any(not isinstance(m, torch.Tensor) or m.dim() != 2 for m in tensors):
        return False
    if any(m.shape != tensors[0].shape for m in tensors[1:]):
        return False
    return tensors[0] if tensors else None


def _state_addresses(cache) -> tuple:
    return tuple(t.data_ptr() for layer in cache.layers for t in layer.state.tensors())


def _window_snapshot(cache) -> list:
    """Copies of the states of the hybrid-window layers: a padded token joins nothing, but it is a
    position, so a padded step moves a window's tail (and folds its oldest position into the
    state). The warm-up and the check run padded steps; they put these copies back."""
    return [(layer, [t.clone() for t in layer.state.tensors()]) for layer in cache.layers
            if layer.state.window is not None]


def _restore(snapshot: list) -> None:
    for layer, saved in snapshot:
        for held, copy in zip(layer.state.tensors(), saved):
            held.copy_(copy)


def _copy_out(value):
    """A replayed output, copied out of the graph's buffers (the next replay overwrites them)."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, tuple):
        return tuple(_copy_out(v) for v in value)
    return value


def _outputs(captured, cache_name: str, cache):
    out = captured.__class__(**{key: _copy_out(val) for key, val in captured.items()})
    for name in CACHE_ARGUMENT_NAMES:  # the output names the cache as the model's output class does
        if name in out.__dataclass_fields__:
            out[name] = cache
    return out


class _CapturedStep:
    """One captured decoding step: its graph, its input buffers and its outputs. It holds no
    reference to the cache (whose state the graph reads and writes by address): a cache that
    is dropped is freed, and the key's state addresses tell a later cache's step apart."""

    def __init__(self, key, graph, inputs: dict, valid: torch.Tensor, outputs):
        self.key = key
        self.graph = graph
        self.inputs = inputs  # name -> static tensor
        self.valid = valid  # (B,) bool: each row's new token is real
        self.outputs = outputs.__class__(**{k: v for k, v in outputs.items() if k not in CACHE_ARGUMENT_NAMES})


class DecodeGraphRunner:
    """What ``get_compiled_call`` returns for a fastmax model: replays captured decoding steps.

    Holds the captured step of the last cache it served (a new cache, batch or argument shape
    captures anew). ``captures`` counts captures, ``replays`` replayed steps, ``eager`` steps it
    ran without a graph; ``capture_seconds`` is the last capture's time (warm-up, capture, check)."""

    def __init__(self, model):
        self.model = model
        self.step: _CapturedStep | None = None
        self.disabled_reason: str | None = None
        self.captures = self.replays = self.eager = 0
        self.capture_seconds = None
        params = inspect.signature(model.forward).parameters
        self._takes_position_ids = "position_ids" in params
        weights = list(model.parameters())
        self._ends = (weights[0], weights[-1]) if weights else ()

    def _weights_key(self) -> tuple:
        """Addresses of the first and last parameters: moving the model (``.to``) changes them,
        and a graph reads the weights by address."""
        return tuple(w.data_ptr() for w in self._ends)

    # -- which calls are replayed --------------------------------------------------------

    def _step_key(self, kwargs: dict, cache_name: str, cache):
        """The key of a replayable call, or None (the call runs eagerly)."""
        if self.disabled_reason is not None or torch.is_grad_enabled() or not self._takes_position_ids:
            return None
        ids = kwargs.get("input_ids")
        if kwargs.get("inputs_embeds") is not None or not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            return None
        if ids.shape[1] != 1 or ids.device.type != "cuda" or not _replayable_cache(cache):
            return None
        if cache.layers[0].state.S.shape[0] != ids.shape[0]:
            return None  # the step raises its own error about the batch
        parts = [id(cache), _state_addresses(cache), self._weights_key(), cache_name]
        for name, value in sorted(kwargs.items()):
            if name in CACHE_ARGUMENT_NAMES or name == "attention_mask":
                continue
            if isinstance(value, torch.Tensor):
                parts.append((name, tuple(value.shape), value.dtype, value.device))
            else:
                try:
                    hash(value)
                except TypeError:
                    return None
                parts.append((name, value))
        if _padding_mask(kwargs.get("attention_mask")) is False:
            return None
        return tuple(parts)

    # -- capture ---------------------------------------------------------------------------

    def _static_kwargs(self, kwargs: dict, cache_name: str, cache):
        """(kwargs of the captured call, its static tensor inputs): buffers for every tensor
        argument and for position_ids, no attention mask."""
        batch = kwargs["input_ids"].shape[0]
        inputs = {}
        call = {}
        for name, value in kwargs.items():
            if name == "attention_mask" or name in CACHE_ARGUMENT_NAMES:
                continue
            if isinstance(value, torch.Tensor):
                inputs[name] = value.clone()
                call[name] = inputs[name]
            else:
                call[name] = value
        if inputs.get("position_ids") is None:
            ids = kwargs["input_ids"]
            inputs["position_ids"] = torch.full((batch, 1), cache.get_seq_length(), dtype=torch.long,
                                                device=ids.device)
            call["position_ids"] = inputs["position_ids"]
        call[cache_name] = cache
        return call, inputs

    def _fill(self, step: _CapturedStep, kwargs: dict, cache, position_shift: int = 0) -> None:
        """Copy this call's inputs into the step's buffers (valid: the mask's last column)."""
        for name, buffer in step.inputs.items():
            value = kwargs.get(name)
            if value is None and name == "position_ids":
                buffer.fill_(cache.get_seq_length() + position_shift)
            else:
                buffer.copy_(value if position_shift == 0 or name != "position_ids" else value + position_shift)
        mask = _padding_mask(kwargs.get("attention_mask"))
        if mask is None:
            step.valid.fill_(True)
        else:
            step.valid.copy_(mask[:, -1] != 0)

    def _set_valid(self, cache, valid) -> None:
        for layer in cache.layers:
            layer.decode_valid = valid

    def _eager_padded(self, call: dict, cache, valid, snapshot: list | None = None) -> object:
        """The step run eagerly with every new token padded: the state is left as it was (windowed
        layers' states put back from ``snapshot``, taken here unless the caller holds one)."""
        seen = [layer.seen_tokens for layer in cache.layers]
        snapshot = _window_snapshot(cache) if snapshot is None else snapshot
        valid.fill_(False)
        try:
            return self.model(**call)
        finally:
            _restore(snapshot)
            for layer, n in zip(cache.layers, seen):
                layer.seen_tokens = n

    def _capture(self, key, kwargs: dict, cache_name: str, cache) -> _CapturedStep | None:
        started = time.perf_counter()
        self.step = None  # the previous graph's memory goes before the new one is taken
        call, inputs = self._static_kwargs(kwargs, cache_name, cache)
        batch = kwargs["input_ids"].shape[0]
        valid = torch.zeros(batch, dtype=torch.bool, device=kwargs["input_ids"].device)
        self._set_valid(cache, valid)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._eager_padded(call, cache, valid)
        torch.cuda.current_stream().wait_stream(side)

        # captured on a side stream without torch.cuda.graph's gc.collect() and empty_cache(),
        # which cost a large process hundreds of milliseconds per capture (one per generate())
        graph = torch.cuda.CUDAGraph()
        seen = [layer.seen_tokens for layer in cache.layers]
        valid.fill_(False)
        side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    outputs = self.model(**call)
                finally:
                    graph.capture_end()
        finally:
            torch.cuda.current_stream().wait_stream(side)
            for layer, n in zip(cache.layers, seen):
                layer.seen_tokens = n
        step = _CapturedStep(key, graph, inputs, valid, outputs)
        self.captures += 1
        ok = self._replays_eager(step, kwargs, call, cache)
        self.capture_seconds = time.perf_counter() - started  # warm-up, capture and check
        if not ok:
            self._set_valid(cache, None)
            return None
        return step

    def _replays_eager(self, step: _CapturedStep, kwargs: dict, call: dict, cache) -> bool:
        """At the next position, with padded tokens (the state untouched; windowed layers' states
        put back after each of the two steps), the replay must give the eager step's logits."""
        self._fill(step, kwargs, cache, position_shift=1)
        for layer in cache.layers:
            layer.seen_tokens += 1
        snapshot = _window_snapshot(cache)
        try:
            step.valid.fill_(False)
            step.graph.replay()
            replayed = step.outputs["logits"].float().clone()
            _restore(snapshot)
            eager = self._eager_padded(call, cache, step.valid, snapshot)["logits"].float()
        finally:
            for layer in cache.layers:
                layer.seen_tokens -= 1
        gap = (replayed - eager).abs().max().item()
        bound = 1e-3 * max(eager.abs().max().item(), 1.0)
        if not gap <= bound:  # also NaN
            self.disabled_reason = (f"a replayed decoding step of {type(self.model).__name__} gave logits {gap:.3g} away "
                                    f"from the eager step's (allowed {bound:.3g})")
            warn_once(f"graphs:{type(self.model).__name__}",
                      f"fastmax_hf: {self.disabled_reason}; this model decodes without CUDA graphs")
            return False
        return True

    # -- the call ------------------------------------------------------------------------------

    def __call__(self, *args, **kwargs):
        cache_name, cache = _cache_of(kwargs)
        key = None if args else self._step_key(kwargs, cache_name, cache)
        if key is None:
            self.eager += 1
            return self.model(*args, **kwargs)
        if self.step is None or self.step.key != key:
            self.step = self._capture(key, kwargs, cache_name, cache)
            if self.step is None:
                self.eager += 1
                return self.model(*args, **kwargs)
        self._fill(self.step, kwargs, cache)
        self._set_valid(cache, self.step.valid)
        self.step.graph.replay()
        for layer in cache.layers:
            layer.seen_tokens += 1
        self.replays += 1
        return _outputs(self.step.outputs, cache_name, cache)


def decode_graph_runner(model) -> DecodeGraphRunner:
    """The model's runner (one per model, kept on it)."""
    runner = model.__dict__.get("_fastmax_decode_graphs")
    if runner is None:
        runner = DecodeGraphRunner(model)
        model.__dict__["_fastmax_decode_graphs"] = runner
    return runner
