"""FastmaxOptions: the one object that carries the kernel's coefficients and scale."""

import dataclasses

import pytest
import torch

import fastmax_hf
from fastmax_hf import FastmaxConfig, FastmaxOptions, fastmax, fastmax_reference
from fastmax_hf.options import default_scale
from fastmax_hf.recurrent import fastmax_step


def test_exported_from_the_package():
    assert fastmax_hf.FastmaxOptions is FastmaxOptions
    assert "FastmaxOptions" in fastmax_hf.__all__


def test_defaults_and_default_scale():
    assert default_scale(16) == 0.25
    options = FastmaxOptions.resolve(16)
    assert options == FastmaxOptions(scale=0.25, p=2, a0=1.0, a1=1.0, a2=0.5, normalize=False, lim=1.0)
    given = FastmaxOptions.resolve(16, scale=2)
    assert given.scale == 2.0 and isinstance(given.scale, float)


def test_frozen():
    options = FastmaxOptions(scale=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.scale = 1.0


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(p=3), ValueError, "`p` must be 1 or 2"),
        (dict(p=True), ValueError, "`p` must be 1 or 2"),
        (dict(a0="1"), TypeError, "`a0`"),
        (dict(a1=float("nan")), TypeError, "`a1`"),
        (dict(a2=float("inf")), TypeError, "`a2`"),
        (dict(lim=0.0), ValueError, "`lim` must be positive"),
        (dict(lim=True), TypeError, "`lim`"),
        (dict(normalize=1), TypeError, "`normalize` must be a bool"),
        (dict(scale=True), TypeError, "`scale`"),
        (dict(scale="0.5"), TypeError, "`scale`"),
        (dict(scale=float("inf")), TypeError, "`scale`"),
    ],
)
def test_validation_names_the_argument(kwargs, error, words):
    with pytest.raises(error, match=words):
        FastmaxOptions.resolve(8, **kwargs)
    direct = {"scale": 0.5, **kwargs}
    with pytest.raises(error, match=words):
        FastmaxOptions(**direct)  # the constructor checks as much as resolve does


def test_direct_construction_needs_a_scale():
    with pytest.raises(TypeError, match="`scale`"):
        FastmaxOptions(scale=None)


@pytest.mark.parametrize("entry", ["fastmax", "fastmax_step", "fastmax_reference"])
def test_every_entry_point_resolves_the_same_way(entry):
    q = torch.randn(1, 1, 3, 9, dtype=torch.float64)
    call = {"fastmax": lambda **kw: fastmax(q, q, q, **kw),
            "fastmax_step": lambda **kw: fastmax_step(q, q, q, None, **kw)[0],
            "fastmax_reference": lambda **kw: fastmax_reference(q, q, q, causal=True, **kw)}[entry]
    with pytest.raises(ValueError, match="`p` must be 1 or 2"):
        call(p=4)
    with pytest.raises(TypeError, match="`scale`"):
        call(scale=float("nan"))
    # scale=None is 1/sqrt(D) = 1/3 everywhere
    kwargs = dict(causal=True) if entry == "fastmax" else {}
    assert torch.equal(call(**kwargs), call(scale=1 / 3, **kwargs))


def test_kernel_and_formula():
    options = FastmaxOptions(scale=1.0, p=2, a0=1.0, a1=2.0, a2=0.5)
    assert options.kernel(2.0) == 1.0 + 4.0 + 2.0
    assert FastmaxOptions(scale=1.0, p=1, a0=1.0, a1=2.0, a2=0.5).kernel(2.0) == 5.0  # a2 unused
    assert options.formula() == "1.0 + 2.0*s + 0.5*s^2"
    assert FastmaxOptions(scale=1.0, p=1).formula() == "1.0 + 1.0*s"


@pytest.mark.parametrize(
    "kwargs, rpe, vanishes",
    [
        (dict(), False, False),  # 1 + s + s^2/2 >= 1/2 everywhere
        (dict(p=1), False, True),  # 1 + s = 0 at s = -1
        (dict(p=1, a1=0.0), False, False),  # the constant 1
        (dict(a2=-0.1), False, True),  # a downward parabola
        (dict(a1=2.0, a2=0.5), False, True),  # 1 + 2s + s^2/2 has real roots
        (dict(p=1, normalize=True, lim=0.9), False, False),  # |s| <= 0.81: 1 + s >= 0.19
        (dict(p=1, normalize=True, lim=0.9), True, True),  # relative positions lift the bound
        (dict(p=1, normalize=True, lim=1.0), False, True),  # s = -1 is reachable
        (dict(a1=2.0, a2=0.5, normalize=True, lim=0.5), False, False),  # |s| <= 0.25, roots near -0.59 and -3.4
    ],
)
def test_can_vanish(kwargs, rpe, vanishes):
    options = FastmaxOptions(scale=1.0, **kwargs)
    assert options.can_vanish(rpe=rpe) is vanishes


def test_score_bound():
    assert FastmaxOptions(scale=-0.5).score_bound() is None
    assert FastmaxOptions(scale=-0.5, normalize=True, lim=2.0).score_bound() == 2.0
    assert FastmaxOptions(scale=-0.5, normalize=True, lim=2.0).score_bound(rpe=True) is None


def test_config_gives_options_for_a_model_scaling():
    config = FastmaxConfig(p=1, a0=2.0, a1=0.5, a2=0.1, temperature=2.0, normalize=True, lim=0.7)
    options = config.options_for(0.3, head_dim=16)
    assert options == FastmaxOptions(scale=0.3 / 2.0, p=1, a0=2.0, a1=0.5, a2=0.1, normalize=True, lim=0.7)
    assert config.options_for(None, head_dim=16).scale == default_scale(16) / 2.0
    # the config is checked like the options, plus its own fields
    with pytest.raises(TypeError, match="`normalize`"):
        FastmaxConfig(normalize="yes")
    with pytest.raises(ValueError, match="`backend`"):
        FastmaxConfig(backend="cuda")
    with pytest.raises(TypeError, match="`temperature`"):
        FastmaxConfig(temperature=float("nan"))
