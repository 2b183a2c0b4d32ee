"""The public entry points give the results they gave before the layout change of issue 12.

``tests/data/results_before_issue12.pt`` holds what ``fastmax``, ``fastmax_step``, the seed API
and the Hugging Face attention function returned (float64, CPU) on the fixed random inputs
below, computed by the code before its coefficients became one ``FastmaxOptions`` and its
backend choice one function. The refactoring changed no arithmetic, so the results agree to
the last bits; the tolerance only allows for another CPU's BLAS summing in another order.

To record new expectations after a deliberate change of the numbers:

    python tests/test_results_unchanged.py
"""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from fastmax_hf import fastmax, fastmax_function, rpe_matrix_creator
from fastmax_hf.integration import FastmaxCacheLayer, fastmax_attention_forward
from fastmax_hf.recurrent import fastmax_step

EXPECTED_PATH = Path(__file__).resolve().parent / "data" / "results_before_issue12.pt"
TOLERANCE = 1e-13  # relative, in float64


def _generator(seed):
    return torch.Generator().manual_seed(seed)


def _normal(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def _padding_mask(gen, batch, length):
    mask = torch.rand(batch, length, generator=gen) > 0.3
    mask[0, : length // 3] = False  # left padding
    return mask


def fastmax_cases():
    """name -> output of ``fastmax`` (and of the seed API, which calls it)."""
    gen = _generator(1201)
    results = {}

    # causal, GQA, padding, the default kernel; quadratic tiling (Nk <= F) and its gradients
    q = _normal(gen, 2, 4, 19, 6).requires_grad_()
    k = _normal(gen, 2, 2, 19, 6).requires_grad_()
    v = _normal(gen, 2, 2, 19, 5).requires_grad_()
    mask = _padding_mask(gen, 2, 19)
    out = fastmax(q, k, v, causal=True, key_padding_mask=mask)
    grads = torch.autograd.grad(out, (q, k, v), _normal(gen, *out.shape))
    results["causal_default"] = out.detach()
    results["causal_default_dq"], results["causal_default_dk"], results["causal_default_dv"] = grads

    # linear tiling (Nk > F = 15 for D = 4), Nq < Nk, every option but rpe, dropout from given noise
    q, k, v = _normal(gen, 2, 2, 7, 4), _normal(gen, 2, 1, 40, 4), _normal(gen, 2, 1, 40, 3)
    mask = _padding_mask(gen, 2, 40)
    noise = _normal(gen, 2, 2, 7, 3)
    for causal in (False, True):
        results[f"options_causal={causal}"] = fastmax(
            q, k, v, causal=causal, key_padding_mask=mask, scale=0.4, a0=2.0, a1=0.7, a2=0.3,
            normalize=True, lim=1.3, dropout=0.2, drop_noise=noise,
        )

    # p = 1 (its denominators are checked), through both PyTorch paths
    q, k, v = _normal(gen, 1, 3, 11, 5), _normal(gen, 1, 3, 11, 5), _normal(gen, 1, 3, 11, 5)
    for backend in ("chunked", "reference"):
        results[f"p1_{backend}"] = fastmax(q, k, v, causal=True, p=1, a0=8.0, a1=0.5, backend=backend)

    # 3-D inputs with relative position vectors (the exact path), and the seed API's temperature
    q, k, v = _normal(gen, 6, 9, 4), _normal(gen, 6, 9, 4), _normal(gen, 6, 9, 4)
    rpe = rpe_matrix_creator(9, 4, "cpu", torch.float64, structured=True)
    results["rpe_3d"] = fastmax(q, k, v, causal=True, rpe_matrix=rpe)
    results["seed_api"] = fastmax_function(q, k, v, mask=True, temperature=2.5, a1=0.9, a2=0.4, normalize=True,
                                           lim=1.1)
    return results


def step_cases():
    """name -> output of ``fastmax_step``: a prefill, then one token at a time."""
    gen = _generator(1202)
    results = {}
    q, k, v = _normal(gen, 2, 4, 17, 6), _normal(gen, 2, 2, 17, 6), _normal(gen, 2, 2, 17, 5)
    mask = torch.ones(2, 17, dtype=torch.bool)
    mask[1, :5] = False
    for name, options in (("step_normalize", dict(scale=0.35, a1=0.6, a2=0.4, normalize=True, lim=0.8)),
                          ("step_p1", dict(p=1, a0=3.0, a1=0.5))):
        out, state = fastmax_step(q[:, :, :12], k[:, :, :12], v[:, :, :12], None, key_padding_mask=mask[:, :12],
                                  **options)
        outs = [out]
        for t in range(12, 17):
            out, state = fastmax_step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                      key_padding_mask=mask[:, t:t + 1], **options)
            outs.append(out)
        results[name] = torch.cat(outs, dim=2)
        results[name + "_S"], results[name + "_z"] = state.S, state.z
    return results


def _module(**fastmax_options):
    """The attributes of an attention module that the attention function reads."""
    config = SimpleNamespace(fastmax=dict(fastmax_options))
    return SimpleNamespace(config=config, is_causal=True, training=False)


def attention_function_cases():
    """name -> output of the Hugging Face attention function, stateless and from a FastmaxCacheLayer."""
    gen = _generator(1203)
    results = {}
    module = _module(a0=1.0, a1=0.9, a2=0.45, temperature=1.3)
    q, k, v = _normal(gen, 2, 4, 13, 8), _normal(gen, 2, 2, 13, 8), _normal(gen, 2, 2, 13, 8)
    mask = torch.ones(2, 13, dtype=torch.bool)
    mask[1, :4] = False
    results["hf_padded"], _ = fastmax_attention_forward(module, q, k, v, mask, scaling=0.3)
    results["hf_default_scaling"], _ = fastmax_attention_forward(module, q, k, v, None)
    packed_positions = torch.cat([torch.arange(5), torch.arange(8)])[None]
    results["hf_packed"], _ = fastmax_attention_forward(module, q[:1], k[:1], v[:1], None, scaling=0.3,
                                                        position_ids=packed_positions)
    torch.manual_seed(7)  # the attention dropout draws its noise from the global generator
    results["hf_dropout"], _ = fastmax_attention_forward(module, q, k, v, mask, dropout=0.25, scaling=0.3)

    normalized = _module(a0=1.0, a1=0.9, a2=0.45, temperature=1.3, normalize=True, lim=1.5)
    layer = FastmaxCacheLayer()
    prefill, _ = fastmax_attention_forward(normalized, q[:, :, :9], k[:, :, :9], v[:, :, :9], mask[:, :9],
                                           scaling=0.3, fastmax_cache_layer=layer)
    outs = [prefill]
    for t in range(9, 13):
        torch.manual_seed(t)
        out, _ = fastmax_attention_forward(normalized, q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1],
                                           mask[:, :t + 1], scaling=0.3, dropout=0.1 if t == 12 else 0.0,
                                           fastmax_cache_layer=layer)
        outs.append(out)
    results["hf_cache"] = torch.cat(outs, dim=1)
    return results


CASES = {"fastmax": fastmax_cases, "fastmax_step": step_cases, "attention_function": attention_function_cases}


@pytest.fixture(scope="module")
def expected():
    return torch.load(EXPECTED_PATH, weights_only=True)


@pytest.mark.parametrize("group", sorted(CASES))
def test_results_are_unchanged(group, expected):
    got = CASES[group]()
    assert sorted(got) == sorted(expected[group])
    for name, tensor in got.items():
        want = expected[group][name]
        assert tensor.dtype == want.dtype == torch.float64 and tensor.shape == want.shape, name
        scale = want.abs().max().item()
        assert (tensor.detach() - want).abs().max().item() <= TOLERANCE * max(scale, 1.0), name


if __name__ == "__main__":
    EXPECTED_PATH.parent.mkdir(exist_ok=True)
    recorded = {group: {name: t.detach() for name, t in make().items()} for group, make in CASES.items()}
    torch.save(recorded, EXPECTED_PATH)
    print(f"wrote {EXPECTED_PATH}: " + ", ".join(f"{g} ({len(r)})" for g, r in recorded.items()))
