"""The one backend choice: each reason, the fallback warning, and its three callers.

Device objects need no device: ``torch.device("cuda")`` describes CUDA tensors on this CPU
machine, and ``backends._import_kernels`` is replaced to play a missing package or triton.
"""

import re
import warnings
from types import SimpleNamespace

import pytest
import torch

from fastmax_hf import FastmaxCache, fastmax, notices
from fastmax_hf.backends import choose_backend, triton_refusal
from fastmax_hf import backends
from fastmax_hf.integration import fastmax_attention_forward
from fastmax_hf.recurrent import fastmax_step

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Every test starts with no warning given yet."""
    monkeypatch.setattr(notices, "WARNED", set())


@pytest.fixture
def kernels_ready(monkeypatch):
    """As on a GPU machine with the package installed: the kernels import and triton is there."""
    monkeypatch.setattr(backends, "_import_kernels", lambda: SimpleNamespace(HAS_TRITON=True))


def _no_kernels():
    raise ModuleNotFoundError("No module named 'fastmax_hf.kernels'")


def choose_without_warning(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return choose_backend(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# choose_backend, reason by reason
# ---------------------------------------------------------------------------------------------


def test_auto_takes_triton_for_cuda_tensors_of_its_dtypes(kernels_ready):
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert choose_without_warning("auto", CUDA, dtype) == "triton"
        assert choose_without_warning("auto", CUDA, dtype, stateful=True) == "triton"


def test_auto_takes_the_pytorch_form_for_cpu_tensors_without_a_word(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # even where the interpreter could run the kernels
    for dtype in (torch.float32, torch.float64):
        assert choose_without_warning("auto", CPU, dtype) == "chunked"
        assert choose_without_warning("auto", CPU, dtype, stateful=True) == "chunked"


def test_auto_takes_the_reference_for_an_rpe_matrix(kernels_ready):
    assert choose_without_warning("auto", CUDA, torch.float32, rpe_matrix=True) == "reference"
    assert choose_without_warning("reference", CPU, torch.float64, rpe_matrix=True) == "reference"


def test_explicit_pytorch_backends():
    assert choose_without_warning("reference", CUDA, torch.float32) == "reference"
    assert choose_without_warning("chunked", CUDA, torch.float32) == "chunked"
    # a state has no O(N^2) form: "reference" steps exactly, in PyTorch
    assert choose_without_warning("reference", CPU, torch.float64, stateful=True) == "chunked"


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_rpe_matrix_needs_the_reference(backend, kernels_ready):
    with pytest.raises(ValueError, match="`rpe_matrix` is only supported by the exact O\\(N\\^2\\) path"):
        choose_backend(backend, CUDA, torch.float32, rpe_matrix=True)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="`backend` must be one of"):
        choose_backend("cuda", CUDA, torch.float32)


@pytest.mark.parametrize(
    "dtype, import_kernels, reason, fix",
    [
        (torch.float64, None, "take float16, bfloat16 or float32 inputs, got torch.float64", "cast the inputs"),
        (torch.float32, _no_kernels, "fastmax_hf.kernels cannot be imported", "pip install -e ."),
        (torch.float32, lambda: SimpleNamespace(HAS_TRITON=False), "triton is not installed", "pip install triton"),
    ],
)
def test_cuda_fallback_warns_once_with_reason_and_fix(monkeypatch, dtype, import_kernels, reason, fix):
    monkeypatch.setattr(backends, "_import_kernels", import_kernels or (lambda: SimpleNamespace(HAS_TRITON=True)))
    with pytest.warns(UserWarning) as caught:
        assert choose_backend("auto", CUDA, dtype) == "chunked"
    (warning,) = caught
    message = str(warning.message)
    assert "slower PyTorch path" in message and reason in message and fix in message
    assert "backend='chunked'" in message  # how to choose the fallback on purpose, silently
    # once per reason: the next call, and the recurrent step, say nothing
    assert choose_without_warning("auto", CUDA, dtype) == "chunked"
    assert choose_without_warning("auto", CUDA, dtype, stateful=True) == "chunked"
    # an explicit backend="triton" refuses, with the same reason
    with pytest.raises(ValueError, match=f"backend='triton' cannot run this call: .*{re.escape(reason)}"):
        choose_backend("triton", CUDA, dtype)


def test_explicit_triton_needs_a_cuda_device(monkeypatch, kernels_ready):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' cannot run this call: .*need a CUDA device, got cpu"):
        choose_backend("triton", CPU, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton's interpreter runs them on CPU tensors (the tests)
    assert choose_backend("triton", CPU, torch.float32) == "triton"


def test_triton_refusal_is_none_when_the_kernels_can_run(kernels_ready):
    assert triton_refusal(CUDA, torch.bfloat16) is None


# ---------------------------------------------------------------------------------------------
# The callers: fastmax, fastmax_step and the cache all go through choose_backend
# ---------------------------------------------------------------------------------------------


def _qkv(dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return tuple(torch.randn(1, 2, 5, 4, generator=g, dtype=dtype) for _ in range(3))


def test_every_caller_refuses_an_impossible_triton_alike(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors pass the device check: the dtype is the reason
    q, k, v = _qkv(torch.float64)
    expected = "backend='triton' cannot run this call: .*torch.float64"
    with pytest.raises(ValueError, match=expected):
        fastmax(q, k, v, causal=True, backend="triton")
    with pytest.raises(ValueError, match=expected):
        fastmax_step(q, k, v, None, backend="triton")
    module = SimpleNamespace(config=SimpleNamespace(fastmax=dict(backend="triton")), is_causal=True, training=False)
    layer = FastmaxCache().layer(0)
    with pytest.raises(ValueError, match=expected):
        fastmax_attention_forward(module, q, k, v, None, fastmax_cache_layer=layer)
    with pytest.raises(ValueError, match=expected):
        fastmax_attention_forward(module, q, k, v, None)


def test_every_caller_takes_reference_as_configured():
    """backend="reference": fastmax runs the definition, the step and the cache the exact PyTorch step."""
    q, k, v = _qkv()
    assert torch.allclose(fastmax(q, k, v, causal=True, backend="reference"), fastmax(q, k, v, causal=True),
                          rtol=1e-12, atol=1e-14)
    stepped, state = fastmax_step(q, k, v, None, backend="reference")
    assert state.layout == "torch"
    module = SimpleNamespace(config=SimpleNamespace(fastmax=dict(backend="reference")), is_causal=True,
                             training=False)
    layer = FastmaxCache().layer(0)
    cached, _ = fastmax_attention_forward(module, q, k, v, None, fastmax_cache_layer=layer)
    assert layer.state.layout == "torch"
    assert torch.allclose(cached.transpose(1, 2), stepped, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------
# A failed import is never silent (issue 15): a broken kernels module (any exception, not only an
# ImportError) or a triton that does not import is named with its own error
# ---------------------------------------------------------------------------------------------


def _broken_kernels():
    raise RuntimeError("CUDA driver initialization failed (kernels/ops.py, line 12)")


def _broken_triton():
    raise ImportError("libcuda.so.1: cannot open shared object file")


@pytest.mark.parametrize(
    "import_kernels, import_triton, words",
    [
        (_broken_kernels, None, "RuntimeError: CUDA driver initialization failed"),
        (_no_kernels, None, "ModuleNotFoundError: No module named 'fastmax_hf.kernels'"),
        (lambda: SimpleNamespace(HAS_TRITON=False), _broken_triton, "ImportError: libcuda.so.1: cannot open"),
    ],
    ids=["broken-kernels", "missing-kernels", "broken-triton"],
)
def test_failed_kernel_import_warns_once_under_auto_and_raises_under_triton(monkeypatch, import_kernels,
                                                                             import_triton, words):
    monkeypatch.setattr(backends, "_import_kernels", import_kernels)
    if import_triton is not None:
        monkeypatch.setattr(backends, "_import_triton", import_triton)
    # backend="auto" on CUDA tensors: the slower path, and one warning that carries the import error
    with pytest.warns(UserWarning, match=re.escape(words)) as caught:
        assert choose_backend("auto", CUDA, torch.float16) == "chunked"
        assert choose_backend("auto", CUDA, torch.float16) == "chunked"
        assert choose_backend("auto", CUDA, torch.bfloat16, stateful=True) == "chunked"
    assert len(caught) == 1
    # backend="triton": an error with the same words, chained to the import error itself
    with pytest.raises(ValueError, match=re.escape(words)) as raised:
        choose_backend("triton", CUDA, torch.float16)
    cause = raised.value.__cause__
    assert cause is not None and words.split(": ", 1)[1] in str(cause)


def test_a_broken_kernel_module_is_raised_by_every_triton_caller(monkeypatch):
    """Through the public functions (CPU tensors pass the device check under Triton's interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(backends, "_import_kernels", _broken_kernels)
    q, k, v = _qkv(torch.float32)
    for call in (lambda: fastmax(q, k, v, causal=True, backend="triton"),
                 lambda: fastmax_step(q, k, v, None, backend="triton")):
        with pytest.raises(ValueError, match="RuntimeError: CUDA driver initialization failed") as raised:
            call()
        assert isinstance(raised.value.__cause__, RuntimeError)


def test_auto_warns_for_broken_kernels_through_fastmax(monkeypatch):
    """fastmax(backend="auto") on a CUDA tensor, with the device check faked: the call runs on the
    PyTorch path and warns once with the import error (the CPU machine has no CUDA tensors; what
    differs is only the device that choose_backend is told)."""
    from fastmax_hf import functional

    monkeypatch.setattr(backends, "_import_kernels", _broken_kernels)
    chosen = []

    def on_cuda(requested, device, dtype, **kw):
        chosen.append(choose_backend(requested, CUDA, dtype, **kw))
        return chosen[-1]

    monkeypatch.setattr(functional, "choose_backend", on_cuda)
    q, k, v = _qkv(torch.float32)
    with pytest.warns(UserWarning, match="RuntimeError: CUDA driver initialization failed") as caught:
        out = fastmax(q, k, v, causal=True)
        fastmax(q, k, v, causal=True)
    assert len(caught) == 1 and chosen == ["chunked", "chunked"]
    assert torch.allclose(out, fastmax(q, k, v, causal=True, backend="chunked"))
