"""Probe one causal-LM family of the installed transformers with attn_implementation="fastmax".

``probe(model_type)`` builds a tiny model of the family from its default config (float32, CPU,
2 layers, hidden size 32, vocabulary 99: ``tiny_config``), then records

    forward     a forward pass of a (2, 6) batch whose first row is left-padded gives finite logits
    generation  greedy generate() of NEW_TOKENS tokens with its cache equals recomputation
                (use_cache=False: every step a full forward, the argmax of its last logits), and
                so do beam search, seeded sampling and greedy search with
                cache_implementation="static" (``OTHER_SEARCHES``)
    cache       the cache generate() used is a FastmaxCache, and its bytes after every step are
                the same (constant in the generated length)

and returns a ``Result`` whose ``status`` is one of

    "state"          all three hold
    "refused"        from_config raised FastmaxUnsupportedError naming the family (``detail``)
    "state (fix)"    refused as configured, all three hold after the config change the error names
                     (e.g. attn_logit_softcapping=None); ``detail`` is the refusal, ``fix`` the change
    "not built"      the tiny model cannot be built or run offline with attn_implementation="eager"
                     either (``detail`` is that error): not a fastmax outcome
    "growing cache"  generation equals recomputation, but generate() keeps a key/value cache: the
                     families of ``fastmax_hf.integration.KV_CACHE_FAMILIES`` (``detail``)
    "no attention layers"  a family without attention (mamba, ...): its FastmaxCache holds only
                     the family's own constant-size states
    "own constant-size cache"  generation equals recomputation with a cache of the family's own
                     whose size does not grow (a state-space model's, in older transformers)
    anything else    a failure of fastmax (``detail`` says what), which the tests reject

Each model is built from its own copy of the config: from_config writes the implementation into
the config object it is given.
"""

from __future__ import annotations

import copy
import dataclasses
import traceback

import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import fastmax_hf
from fastmax_hf import FastmaxCache, FastmaxUnsupportedError
from fastmax_hf.integration import FastmaxCacheLayer

VOCAB = 99
PROMPT = 6
NEW_TOKENS = 5

# Sizes every tiny config gets, where its config class has the attribute (read through the
# class's attribute_map, so n_embd, n_layer, ... are covered too).
TINY = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, intermediate_size=64, ffn_dim=64, max_position_embeddings=128,
    rotary_dim=4, is_decoder=True,  # encoder families (BERT, ...) as causal LMs need is_decoder
    # encoder-decoder families used as decoders (BART, ...)
    d_model=32, decoder_layers=2, encoder_layers=2, decoder_attention_heads=4, encoder_attention_heads=4,
    decoder_ffn_dim=64, encoder_ffn_dim=64, num_decoder_layers=2, num_encoder_layers=2,
    # mixtures of experts
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    shared_expert_intermediate_size=16, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
    # mamba layers of hybrid families: 8 heads divide 2 * hidden
    mamba_n_heads=8,
    # multi-head latent attention
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
    # special tokens inside the vocabulary
    bos_token_id=1, eos_token_id=2, pad_token_id=0, decoder_start_token_id=1,
    # deterministic
    attention_dropout=0.0, hidden_dropout=0.0, dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2,
)


@dataclasses.dataclass
class Result:
    family: str
    status: str
    detail: str = ""
    fix: dict | None = None
    reason: str = ""  # a refusal's FastmaxUnsupportedError.reason

    def record(self) -> dict:
        out = {"status": self.status}
        for name in ("reason", "fix", "detail"):
            if getattr(self, name):
                out[name] = getattr(self, name)
        return out


def causal_lm_families() -> list[str]:
    """Every model type of transformers' causal-LM auto mapping, in its order."""
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


DROPOUTS = {name for name in TINY if "drop" in name}
MAX_PARAMETERS = 20_000_000  # a "tiny" model above this did not shrink: not run


def _settable(config, name: str) -> bool:
    attribute = getattr(type(config), name, None)
    if isinstance(attribute, property) and attribute.fset is None:  # e.g. a derived head_dim
        return False
    try:
        current = getattr(config, name)
    except AttributeError:
        return False
    except Exception:  # noqa: BLE001 - e.g. per-layer attributes that refuse a global read
        return False
    if name in DROPOUTS and not isinstance(current, float):  # some configs type them int
        return False
    try:  # some configs refuse a value for an attribute they have (xlnet's max_position_embeddings)
        setattr(copy.copy(config), name, TINY[name])
    except Exception:  # noqa: BLE001
        return False
    return True


def _overrides_for(config) -> dict:
    overrides = {name: value for name, value in TINY.items() if _settable(config, name)}
    if "kv_lora_rank" in overrides and "num_key_value_heads" in overrides:
        overrides["num_key_value_heads"] = TINY["num_attention_heads"]  # latent attention: one key per head
    return overrides


def _layers_for(config) -> int:
    """2, or enough layers to include the first attention layer of a hybrid (mamba / linear) family."""
    layer_types = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    attention = [i for i, t in enumerate(layer_types)
                 if t == "hybrid" or ("attention" in str(t) and "linear" not in str(t))]
    return max(2, attention[0] + 1) if attention else 2




def _per_layer_cut(config, layers: int) -> dict:
    """The config's per-layer fields (lists with one entry per layer, dicts keyed by layer index) cut to
    ``layers`` layers, so that they agree with the smaller layer count."""
    default_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(default_layers, int) or layers >= default_layers:
        return {}
    cut = {}
    for name, value in config.to_dict().items():
        if isinstance(value, list) and len(value) == default_layers:
            cut[name] = value[:layers]
        elif isinstance(value, dict) and value and all(isinstance(k, (int, str)) and str(k).isdigit() for k in value):
            cut[name] = {k: v for k, v in value.items() if int(k) < layers}
    return cut


def _shrunk(config) -> dict:
    """Keyword arguments that rebuild ``config`` tiny."""
    kwargs = _overrides_for(config)
    if "num_hidden_layers" in kwargs:
        kwargs["num_hidden_layers"] = _layers_for(config)
        kwargs = {**_per_layer_cut(config, kwargs["num_hidden_layers"]), **kwargs}
    return kwargs


def tiny_config(model_type: str):
    """The family's default config with TINY's sizes (sub-configs shrunk alike)."""
    default = AutoConfig.for_model(model_type)
    kwargs = _shrunk(default)
    for key in getattr(default, "sub_configs", {}) or {}:
        sub = getattr(default, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kwargs[key] = {**sub.to_dict(), **_shrunk(sub)}
    config = AutoConfig.for_model(model_type, **kwargs)
    config.use_cache = True
    return config


def _build(config, implementation):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=implementation)
    return model.to(torch.float32).eval()


def _inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, PROMPT), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :2], mask[0, :2] = 0, 0  # row 0 left-padded by 2
    return ids, mask


def _generate(model, ids, mask, use_cache, **kwargs):
    kwargs = {"do_sample": False, **kwargs}
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                          pad_token_id=0, use_cache=use_cache, return_dict_in_generate=True, **kwargs)


# Besides greedy search: each compared with recomputation (the same seed before each sampling run).
OTHER_SEARCHES = {
    "beam search": dict(num_beams=2),
    "sampling": dict(do_sample=True, top_k=8),
    "static cache": dict(cache_implementation="static"),
}


def _tensor_bytes(held) -> int:
    if isinstance(held, torch.Tensor):
        return held.numel() * held.element_size()
    if isinstance(held, dict):
        return sum(_tensor_bytes(v) for v in held.values())
    if isinstance(held, (list, tuple)):
        return sum(_tensor_bytes(v) for v in held)
    return 0


def _cache_bytes(cache) -> int:
    """Bytes a cache holds: FastmaxCache.nbytes, else every tensor of the cache and of its layers."""
    if isinstance(cache, FastmaxCache):
        return cache.nbytes()
    layers = getattr(cache, "layers", [])
    own = {k: v for k, v in vars(cache).items() if k != "layers"}
    return _tensor_bytes(own) + sum(_tensor_bytes(vars(layer)) for layer in layers)


def _returned_cache(output):
    return getattr(output, "cache", None) or getattr(output, "past_key_values", None)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= 300 else text[:297] + "..."


def _parameter_count(config) -> int:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager")
    return sum(p.numel() for p in model.parameters())


def _eager_error(config) -> BaseException | None:
    """The error that building and running the tiny model with eager attention raises, or None."""
    try:
        count = _parameter_count(config)
        if count > MAX_PARAMETERS:
            return ValueError(f"the tiny config still has {count} parameters (its config did not shrink)")
        model = _build(config, "eager")
        ids, mask = _inputs()
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        return None
    except Exception as error:  # noqa: BLE001 - any failure of transformers itself
        return error


def _run_fastmax(family: str, config) -> Result:
    model = _build(config, "fastmax")
    ids, mask = _inputs()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    if not bool(torch.isfinite(logits[:, 2:]).all()):
        return Result(family, "forward not finite")

    # The bytes of the cache after every forward of generate(), read from each forward's output.
    sizes = []
    original_update = model._update_model_kwargs_for_generation

    def update_and_measure(outputs, *args, **kwargs):
        model_kwargs = original_update(outputs, *args, **kwargs)
        # the forward's output holds the cache, or (RecurrentGemma's does not) generate's model kwargs do
        cache = _returned_cache(outputs) or next(
            (model_kwargs[n] for n in ("cache", "past_key_values") if model_kwargs.get(n) is not None), None)
        sizes.append(None if cache is None else _cache_bytes(cache))
        return model_kwargs

    model._update_model_kwargs_for_generation = update_and_measure
    with torch.no_grad():
        cached = _generate(model, ids, mask, True)
        model._update_model_kwargs_for_generation = original_update
        recomputed = _generate(model, ids, mask, False)
    cache = _returned_cache(cached)
    if not torch.equal(cached.sequences, recomputed.sequences):
        return Result(family, "generation differs", f"cached {cached.sequences[:, PROMPT:].tolist()} vs "
                                                    f"recomputed {recomputed.sequences[:, PROMPT:].tolist()}")
    unchecked = []  # searches whose cached run differs from recomputation under eager attention too
    for search, kwargs in OTHER_SEARCHES.items():
        if search == "static cache" and not isinstance(_returned_cache(cached), FastmaxCache):
            continue  # a family that keeps its key/value cache refuses a static one (tests/test_static_decoding.py)
        runs = _cached_and_recomputed(model, ids, mask, kwargs)
        if not torch.equal(*runs):
            # transformers' own cache for the family may not reproduce recomputation for this search
            # (the eager model, softmax attention, same weights): then the search says nothing of fastmax
            if search != "static cache" and not torch.equal(*_cached_and_recomputed(_build(config, "eager"), ids,
                                                                                      mask, kwargs)):
                unchecked.append(search)
                continue
            return Result(family, "generation differs", f"{search}: cached {runs[0][:, PROMPT:].tolist()} vs "
                                                        f"recomputed {runs[1][:, PROMPT:].tolist()}")
    if None in sizes or len(sizes) != NEW_TOKENS:
        return Result(family, "cache not measured", f"cache bytes per step {sizes}")
    if not isinstance(cache, FastmaxCache):
        if len(set(sizes)) == 1:  # e.g. an older transformers' MambaCache
            return Result(family, "own constant-size cache", f"generate() used a {type(cache).__name__}")
        return Result(family, "growing cache", f"generate() used a {type(cache).__name__}")
    if len(set(sizes)) != 1:
        return Result(family, "cache grows", f"cache bytes per step {sizes}")
    states = [layer for layer in cache.layers if isinstance(layer, FastmaxCacheLayer)]
    if not states:
        return Result(family, "no attention layers", "the FastmaxCache holds only the family's own mamba/conv states")
    if any(layer.state is None for layer in states):
        return Result(family, "state not filled", "a fastmax layer of the cache holds no state after generate()")
    detail = f"{', '.join(unchecked)}: cached differs from recomputed with eager attention too" if unchecked else ""
    return Result(family, "state", detail)


def _cached_and_recomputed(model, ids, mask, kwargs) -> list:
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        with torch.no_grad():
            runs.append(_generate(model, ids, mask, use_cache, **kwargs).sequences)
    return runs


def probe(family: str) -> Result:
    """Build, run and generate with the family's tiny model; see the module docstring."""
    try:
        config = tiny_config(family)
    except Exception as error:  # noqa: BLE001
        return Result(family, "not built", "config: " + _short(error))
    fastmax_hf.set_fastmax_config(config)
    eager_error = _eager_error(config)
    if eager_error is not None:
        return Result(family, "not built", _short(eager_error))
    try:
        return _run_fastmax(family, config)
    except FastmaxUnsupportedError as refusal:
        if refusal.family != family and refusal.family != getattr(config, "model_type", None):
            return Result(family, "refused for another family", _short(refusal))
        if refusal.fix is None:
            return Result(family, "refused", str(refusal), reason=refusal.reason)
        fixed = copy.deepcopy(config)
        for name, value in refusal.fix.items():
            setattr(fixed, name, value)
            text = fixed.get_text_config(decoder=True)
            if text is not fixed:
                setattr(text, name, value)
        try:
            result = _run_fastmax(family, fixed)
        except Exception as error:  # noqa: BLE001
            return Result(family, "failed after fix", _short(error), refusal.fix, refusal.reason)
        if result.status != "state":
            return dataclasses.replace(result, fix=refusal.fix, reason=refusal.reason)
        detail = str(refusal) + (f"; {result.detail}" if result.detail else "")
        return Result(family, "state (fix)", detail, refusal.fix, refusal.reason)
    except Exception as error:  # noqa: BLE001
        return Result(family, "error", _short(error) + " | " + traceback.format_exc(limit=-3).replace("\n", " ")[-400:])
