"""The maintainer tools of tools/ on a CPU: their shared helpers, argument checks, the parts
that need no GPU (the report, the correctness check in Triton's interpreter, the conversion
experiment at a tiny scale), and that every repository path the documents cite exists."""

import dataclasses
import fnmatch
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import load_script

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
sys.path.insert(0, str(TOOLS))  # the tools import gpu_common as `python tools/<tool>.py` would

import gpu_common  # noqa: E402

kernels = pytest.importorskip("fastmax_hf.kernels")  # triton is a Linux dependency of the package

bench = load_script(TOOLS / "bench_kernels.py", "bench_kernels_tool")
check = load_script(TOOLS / "check_kernels.py", "check_kernels_tool")
report = load_script(TOOLS / "report_benchmarks.py", "report_benchmarks_tool")
trace = load_script(TOOLS / "trace_memory.py", "trace_memory_tool")
experiment = load_script(TOOLS / "finetune_experiment.py", "finetune_experiment_tool")


def a_setting_change():
    """One valid change of a kernel setting, found from the settings themselves (names change)."""
    for field in dataclasses.fields(kernels.KernelSettings):
        if isinstance(field.default, int) and not isinstance(field.default, bool) and field.default > 1:
            return {field.name: field.default * 2}  # a positive power of 2 stays one
    raise AssertionError("no integer kernel setting with a default above 1")


# --------------------------------------------------------------------------- gpu_common


def test_rel_err_is_the_relative_norm_of_the_difference_in_float64():
    expected = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert gpu_common.rel_err(expected, expected) == 0.0
    assert gpu_common.rel_err(expected * 1.1, expected) == pytest.approx(0.1, rel=1e-12)
    assert gpu_common.rel_err(torch.tensor([3.0, 4.0]), torch.zeros(2)) == 5.0  # all-zero reference: the norm
    # half-precision inputs are compared in float64: 1 + 2^-10 is exact in fp16 and its error is kept
    one = torch.ones(4, dtype=torch.float16)
    assert gpu_common.rel_err(one + 2.0 ** -10, one) == pytest.approx(2.0 ** -10, rel=1e-12)
    assert math.isnan(gpu_common.rel_err(torch.tensor([math.nan, 1.0]), torch.ones(2)))  # NaN fails `< target`


def test_poisoned_shows_what_a_function_leaves_unwritten():
    def half_written(n):
        out = torch.empty(n)
        out[: n // 2] = 1.0
        return out

    original_empty, original_empty_like = torch.empty, torch.empty_like
    with gpu_common.Poisoned():
        out = half_written(6)
        like = torch.empty_like(torch.zeros(2, 3, dtype=torch.float16))
        ints = torch.empty(3, dtype=torch.int64)  # only floating tensors can hold NaN
    assert torch.equal(out[:3], torch.ones(3)) and torch.isnan(out[3:]).all()
    assert like.dtype == torch.float16 and torch.isnan(like).all()
    assert ints.dtype == torch.int64
    assert torch.empty is original_empty and torch.empty_like is original_empty_like
    with pytest.raises(RuntimeError, match="inside"):
        with gpu_common.Poisoned():
            raise RuntimeError("inside")
    assert torch.empty is original_empty and torch.empty_like is original_empty_like


def test_oom_is_recognised_by_type_or_message():
    assert gpu_common.is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert gpu_common.is_oom(RuntimeError("triton: out of memory while launching"))
    assert not gpu_common.is_oom(RuntimeError("shape mismatch"))


def test_settings_json_and_sweep_grid():
    assert gpu_common.json_object(None) == {} and gpu_common.json_object("") == {}
    assert gpu_common.json_object('{"a": 1}') == {"a": 1}
    for bad in ("[1, 2]", "{not json"):
        with pytest.raises(SystemExit, match="--settings"):
            gpu_common.json_object(bad)
    grid = gpu_common.sweep_combinations({"a": [1, 2], "b": [3, 4, 5]})
    assert len(grid) == 6 and grid[0] == {"a": 1, "b": 3} and grid[-1] == {"a": 2, "b": 5}
    with pytest.raises(SystemExit, match="'a'"):
        gpu_common.sweep_combinations({"a": 3})


def test_kernel_settings_change_inside_the_block_only_and_refuse_unknown_names():
    change = a_setting_change()
    (name, value), = change.items()
    before = kernels.current_settings()
    with gpu_common.kernel_settings(change):
        assert getattr(kernels.current_settings(), name) == value
        meta = gpu_common.run_metadata()
        assert meta["kernel_settings"] == dataclasses.asdict(kernels.current_settings())
        assert meta["kernel_settings"][name] == value
    assert kernels.current_settings() == before
    with pytest.raises(SystemExit, match="no_such_setting"):
        with gpu_common.kernel_settings({"no_such_setting": 1}):
            pass
    assert kernels.current_settings() == before
    for key in ("gpu", "torch", "triton", "transformers", "fastmax_hf", "date", "command"):
        assert key in meta


# --------------------------------------------------------------------------- bench_kernels


def test_bench_arguments_and_its_default_tune_grid_are_valid_settings():
    args = bench.parse_args([])
    assert args.section_list == ["long", "crossover", "seed", "fla", "decode"]
    bench.check_settings(bench.parse_args(["--sections", "tune"]))  # the default grid names real settings
    args = bench.parse_args(["--sections", "long,tune", "--tune", json.dumps({k: [v, v] for k, v in a_setting_change().items()}),
                             "--settings", json.dumps(a_setting_change())])
    bench.check_settings(args)
    assert args.section_list == ["long", "tune"] and args.settings_changes == a_setting_change()
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "long,everything"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "tune", "--tune_regimes", "cubic"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--sections", "tune", "--tune_causal", "yes"])
    assert bench.bools(bench.parse_args(["--sections", "tune", "--tune_causal", "true,false"]).tune_causal) == [True, False]
    with pytest.raises(SystemExit, match="no_such_setting"):
        bench.check_settings(bench.parse_args(["--sections", "tune", "--tune", '{"no_such_setting": [1, 2]}']))
    with pytest.raises(SystemExit, match="no_such_setting"):
        bench.main(["--sections", "long", "--settings", '{"no_such_setting": 1}'])


def test_bench_checks_a_configuration_before_timing_it_and_records_failures(monkeypatch):
    # the timing and memory probes need a GPU: here they only run the call once
    monkeypatch.setattr(bench, "peak_mib", lambda fn: (fn(), 7.0)[1])
    monkeypatch.setattr(bench, "bench_ms", lambda fn: (fn(), 1.5)[1])

    def make():
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(1, 2, 50, 16, generator=gen).requires_grad_() for _ in range(3)]

    check_tail = lambda out, q, k, v: bench.check_tail(out, q, k, v, True, q.shape[-1] ** -0.5)  # noqa: E731
    for regime in ("quadratic", "linear"):
        res = bench.timed("fastmax", make, lambda q, k, v: bench.fastmax_call(q, k, v, True, regime), True, check_tail)
        assert set(res) == {"ms", "peak_mib", "rel_err"} and (res["ms"], res["peak_mib"]) == (1.5, 7.0)
        assert res["rel_err"] < 1e-5, (regime, res)
    wrong = bench.timed("fastmax", make, lambda q, k, v: (lambda: q * 2), False, check_tail)
    assert wrong["error"].startswith("check failed: rel err")

    def raising(message):
        def call():
            raise RuntimeError(message)
        return lambda q, k, v: call
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    assert bench.timed("x", make, raising("CUDA out of memory. Tried to allocate"), False) == {"error": "OOM"}
    assert bench.timed("x", make, raising("bad shape"), False) == {"error": "RuntimeError: bad shape"}


def test_bench_graph_timing_is_recorded_beside_the_eager_time_or_its_error(monkeypatch):
    monkeypatch.setattr(bench, "peak_mib", lambda fn: (fn(), 7.0)[1])
    monkeypatch.setattr(bench, "bench_ms", lambda fn: (fn(), 1.5)[1])
    replays = []
    monkeypatch.setattr(bench, "graph_bench_ms", lambda fn: (fn(), replays.append(1), 0.5)[2])

    def make():
        gen = torch.Generator().manual_seed(1)
        return [torch.randn(1, 2, 37, 16, generator=gen).requires_grad_() for _ in range(3)]

    import fastmax_hf

    public = lambda q, k, v: (lambda: fastmax_hf.fastmax(q, k, v, causal=True))  # noqa: E731
    check_tail = lambda out, q, k, v: bench.check_tail(out, q, k, v, True, q.shape[-1] ** -0.5)  # noqa: E731
    res = bench.timed("fastmax", make, public, True, check_tail, graph=True)
    assert set(res) == {"ms", "peak_mib", "rel_err", "graph_ms"} and res["graph_ms"] == 0.5 and replays == [1]
    assert res["rel_err"] < 1e-5  # the public function's default scale is the one the check assumes
    assert "graph_ms" not in bench.timed("fastmax", make, public, True, check_tail)  # only when asked

    def uncapturable(fn):
        raise RuntimeError("operation not permitted when stream is capturing")
    monkeypatch.setattr(bench, "graph_bench_ms", uncapturable)
    res = bench.timed("fastmax", make, public, False, check_tail, graph=True)
    assert res["ms"] == 1.5 and res["graph_error"].startswith("RuntimeError: operation not permitted")


def test_bench_linear_flops_count_the_useful_work():
    F = 1 + 64 + 64 * 65 // 2
    assert bench.feature_count(64) == F == 2145
    assert bench.linear_flops(1000, 16, 64, 64, backward=False) == 4 * F * 64 * 1000 * 16
    # forward+backward: 12 F Dv (the kernel issue's count; the backward's recomputed states not counted)
    assert bench.linear_flops(1000, 16, 64, 64, backward=True) == 12 * F * 64 * 1000 * 16


# --------------------------------------------------------------------------- check_kernels


def test_check_grid_filters_and_group_heads_means_one_head_per_launch():
    cases = check.grid(True, ["bfloat16"], [64], long_cases=False)
    assert len(cases) == 8  # padded Nq = Nk, and unpadded Nq < Nk, each causal or not, in each regime
    assert {c[11] for c in cases} == {True, False}
    assert {(c[7], c[5]) for c in cases} == {(torch.bfloat16, 64)}
    assert {(c[8], c[9]) for c in cases} == {(False, "quadratic"), (False, "linear"), (True, "quadratic"), (True, "linear")}
    full = check.grid(False)
    assert {c[7] for c in full} == {torch.bfloat16, torch.float16, torch.float32}
    assert any(c[3] * c[4] > 4096 * 4096 for c in full)  # the long cases are in
    assert not any(c[3] * c[4] > 4096 * 4096 for c in check.grid(False, long_cases=False))

    args = check.parse_args(["--group-heads", "--settings", json.dumps(a_setting_change())])
    assert args.settings_changes == {**a_setting_change(), **check.ONE_HEAD_PER_LAUNCH}
    q = torch.empty(1, 8, 4096, 64)
    k = v = torch.empty(1, 4, 4096, 64)
    assert kernels.ops.heads_per_launch(q, k, v) == 4  # small tensors: all heads in one launch
    with gpu_common.kernel_settings(args.settings_changes):
        assert kernels.ops.heads_per_launch(q, k, v) == 1
    with pytest.raises(SystemExit):
        check.parse_args(["--dtypes", "float8"])


@pytest.mark.parametrize("regime", ["quadratic", "linear"])
def test_check_case_passes_for_the_kernels_in_the_interpreter(regime):
    # (B, Hq, Hk, Nq, Nk, D, Dv, dtype, causal, regime, p, padding, layout): GQA, padding, HF strides
    gen = torch.Generator().manual_seed(0)
    for case in ((2, 4, 2, 33, 33, 16, 16, torch.float32, True, regime, 2, True, "bnhd"),
                 (1, 2, 1, 20, 45, 16, 8, torch.float32, False, regime, 1, False, "bhnd")):
        result = check.check_case(case, gen, device="cpu")
        assert result["pass"] and not result["nan"], result
        assert set(result) == {"nan", "out", "dq", "dk", "dv", "pass"}
        assert max(result[k] for k in ("out", "dq", "dk", "dv")) < 1e-4


def test_check_decode_continues_a_prefill_token_by_token():
    result = check.check_decode(torch.Generator().manual_seed(0), torch.float32, 16, 16, N=40, split=30, device="cpu")
    assert result["pass"] and result["out"] < 1e-4


# --------------------------------------------------------------------------- trace_memory


def test_window_sweep_candidates_are_valid_settings():
    from fastmax_hf.kernels import KernelSettings

    sweep = load_script(TOOLS / "window_sweep.py", "window_sweep_tool")
    for block_m, block_n, warps in sweep.CANDIDATES:
        KernelSettings(window_block_m=block_m, window_block_n=block_n, window_warps=warps)


def test_kernel_registers_counts_sass_opcodes_with_and_without_predicates(monkeypatch):
    # the tool drops TRITON_INTERPRET when imported (it compiles): restored after this test
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    registers = load_script(TOOLS / "kernel_registers.py", "kernel_registers_tool")
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @!P0 FFMA R2, R3, R4, R5 ;
        /*0020*/                   MUFU.EX2 R6, R7 ;
        /*0030*/               @P1 ISETP.GE.AND P0, PT, R8, R9, PT ;
        /*0040*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;
        /*0050*/                   EXIT ;
    """
    counts = registers.sass_counts(sass)
    assert counts == {"sass_instructions": 6, "sass_elementwise": 3, "sass_mufu": 1, "sass_hgmma": 1}


def test_host_profile_lists_the_profiled_function():
    def busy_little_function():
        return sum(i * i for i in range(200))

    text = gpu_common.host_profile(busy_little_function, calls=7, top=5)
    assert "busy_little_function" in text and "7 " in text and "Ordered by: internal time" in text


def test_window_ab_tiles_are_valid_settings_and_its_check_reads_the_last_rows():
    from fastmax_hf import fastmax
    from fastmax_hf.kernels import KernelSettings

    ab = load_script(TOOLS / "window_ab.py", "window_ab_tool")
    for fwd, dq, dkdv in ab.TILES:
        KernelSettings(quad_fwd_block_m=fwd[0], quad_fwd_block_n=fwd[1], quad_fwd_warps=fwd[2], quad_fwd_stages=fwd[3],
                       quad_dq_block_m=dq[0], quad_dq_block_n=dq[1], quad_dq_warps=dq[2], quad_dq_stages=dq[3],
                       quad_dkdv_block_m=dkdv[0], quad_dkdv_block_n=dkdv[1], quad_dkdv_warps=dkdv[2],
                       quad_dkdv_stages=dkdv[3])
    with pytest.raises(SystemExit):
        ab.main(["--sections", "kernels,nope"])
    # the float64 check against the PyTorch forms (the tool's own forwards need a GPU)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 200, 16, generator=g) for _ in range(3))
    forwards = {"fastmax": lambda: fastmax(q, k, v, causal=True, backend="chunked"),
                "window": lambda: fastmax(q, k, v, causal=True, backend="chunked", window=ab.WINDOW)}
    errors = ab.check_last_rows(q, k, v, forwards, rows=50)
    assert set(errors) == {"fastmax", "window"} and max(errors.values()) < 1e-5
    wrong = {"window": lambda: fastmax(q, k, v, causal=True, backend="chunked")}  # no window: must not pass
    assert ab.check_last_rows(q, k, v, wrong, rows=50)["window"] > 1e-3


def test_window_ab_host_layers_compute_the_same_attention_at_every_layer():
    """``--sections host`` times five layers of one call; each layer's two calls run (here in
    Triton's interpreter) and compute what the layer above them does."""
    from fastmax_hf import kernels

    ab = load_script(TOOLS / "window_ab.py", "window_ab_tool")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 80, 16, generator=g).requires_grad_() for _ in range(3))
    do = torch.randn(1, 2, 80, 16, generator=g)
    small = dict(quad_fwd_block_m=16, quad_fwd_block_n=16, quad_dq_block_m=16, quad_dq_block_n=16,
                 quad_dkdv_block_m=16, quad_dkdv_block_n=16)
    with kernels.settings(**small):
        layers = ab.host_layers(q, k, v, do)
        assert list(layers) == ["public_fwd", "core_fwd", "launch_fwd", "launch_bwd", "autograd_bwd"]
        results = {layer: {name: call() for name, call in calls.items()} for layer, calls in layers.items()}
    for name in ("fastmax", "window"):
        public = results["public_fwd"][name]
        assert torch.allclose(results["core_fwd"][name][0], public, atol=1e-6)
        assert torch.allclose(results["launch_fwd"][name][0], public, atol=1e-6)
        for a, b in zip(results["launch_bwd"][name][:3], results["autograd_bwd"][name]):
            assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(results["public_fwd"]["fastmax"], results["public_fwd"]["window"])


def test_trace_memory_arguments_and_its_default_budgets_are_valid_settings():
    args = trace.parse_args(["--n", "65536", "--heads", "4", "--dims", "64"])
    assert (args.n, args.heads, args.dim_list) == (65536, 4, [64])
    assert args.budget_list[0] == {}
    for budget in args.budget_list:
        with gpu_common.kernel_settings(budget):
            pass
    for bad in ("{}", "[1]", "[]", "not json"):
        with pytest.raises(SystemExit):
            trace.parse_args(["--budgets", bad])
    row = dict(D=64, N=1024, heads=4, repetition=1, ms=12.3, heads_per_launch=2, after_forward_gib=1.0,
               forward_peak_gib=1.5, after_backward_gib=2.0, backward_peak_gib=2.5, peak_over_io=1.2)
    line = trace.line(row | {"peak_total_gib": 3.0}, {"x": 1})
    assert "heads/launch=2" in line and "3.00 GiB = 1.200 x io" in line and "after forward 1.00/1.50" in line


# --------------------------------------------------------------------------- report_benchmarks


def _entry(D, N, passname, fastmax_ms, regime, cudnn_ms=None, tflops=None):
    fastmax = {"ms": fastmax_ms, "peak_mib": 2048.0, "rel_err": 1e-3}
    if tflops:
        fastmax["tflops"] = tflops
    entry = {"D": D, "N": N, "pass": passname, "regime": regime, "fastmax": fastmax,
             "sdpa_flash": {"error": "skipped: N > 4096 (quadratic cost)"},
             "sdpa_cudnn": {"ms": cudnn_ms, "peak_mib": 1024.0} if cudnn_ms else {"error": "OOM"}}
    if cudnn_ms:
        entry["ratio_to_best_sdpa"] = fastmax_ms / cudnn_ms
    return entry


def test_report_turns_a_small_result_file_into_tables_and_plots(tmp_path):
    results = {
        "meta": {"gpu": "Test GPU", "torch": "2.x", "triton": "3.x", "fastmax_hf": "0.1.0", "date": "2030-01-01"},
        "long": [_entry(64, 4096, "fwd", 0.5, "quadratic", 0.25, tflops=9.0),
                 _entry(64, 4096, "fwd+bwd", 1.5, "quadratic", 0.5),
                 _entry(64, 65536, "fwd", 15.0, "linear", 20.0, tflops=38.2),
                 _entry(64, 65536, "fwd+bwd", 44.4, "linear", tflops=45.0)],
        "crossover": [{"D": 64, "N": 4096, "pass": p, "quadratic": {"ms": 1.0}, "linear": {"ms": lin}}
                      for p, lin in (("fwd", 2.0), ("fwd+bwd", 3.0))],
        "decode": [{"D": 64, "context": 4096, "fastmax_step": {"ms": 0.0861, "state_mib": 5.24},
                    "sdpa_kv_cache": {"ms": 0.015, "cache_mib": 8.0}}],
    }
    (tmp_path / "bench.json").write_text(json.dumps(results))
    (tmp_path / "notes.md").write_text("## Notes\n\nhand-written\n")
    out = tmp_path / "report" / "BENCHMARKS.md"
    report.main(["--results", str(tmp_path / "bench.json"), "--out", str(out), "--analysis", str(tmp_path / "notes.md"),
                 "--quadratic", "none"])
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nGPU: **Test GPU**, torch 2.x, Triton 3.x, fastmax_hf 0.1.0, 2030-01-01.")
    assert "![long context](../long_context.png)" in text and "![crossover](../crossover.png)" in text
    assert "| 4,096 | 0.50 | – | 0.25 | 2.00 | 2.00 | 1.00 | – |" in text  # quadratic ran: no TFLOP/s
    assert "| 65,536 | 15.00 | – | 20.00 | 0.75 | 2.00 | 1.00 | 38 |" in text
    assert "| 65,536 | 44.40 | – | OOM | – | 2.00 | – | 45 |" in text
    assert "| 64 | 4,096 | 1.00 | 2.00 | 1.00 | 3.00 |" in text  # the crossover of the results file itself
    assert "| 64 | 4,096 | 0.086 | 5.2 | 0.015 | 8 |" in text
    assert "### D=128" not in text and "seed library" not in text  # only the sections present
    assert text.endswith("## Notes\n\nhand-written\n")
    for name in ("long_context.png", "crossover.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report.main(["--results", str(tmp_path / "bench.json"), "--out", str(out), "--crossover", "none",
                 "--plots", str(tmp_path / "plots"), "--analysis", "none", "--quadratic", "none"])
    text = out.read_text()
    assert "Crossover" not in text and "Notes" not in text and "![long context](../plots/long_context.png)" in text

    # a quadratic-regime file: its table, and its crossover section in place of the results'
    quadratic = {"meta": results["meta"], "quadratic": [
        {"B": 8, "D": 64, "causal": True, "N": 4096, "pass": "fwd+bwd", "fastmax": {"ms": 2.0},
         "sdpa_flash": {"ms": 4.0}, "sdpa_cudnn": {"ms": 2.5}, "ratio_to_best_sdpa": 0.8},
        {"B": 1, "D": 64, "causal": True, "N": 4096, "pass": "fwd", "fastmax": {"ms": 0.5},
         "sdpa_flash": {"error": "x"}, "sdpa_cudnn": {"ms": 0.25}, "ratio_to_best_sdpa": 2.0,
         "flex_log_f": {"ms": 1.5}, "flex_over_fastmax": 3.0}],
        "crossover": [{"D": 128, "N": 8192, "pass": "fwd", "quadratic": {"ms": 4.0}, "linear": {"ms": 5.0}}]}
    (tmp_path / "quadratic.json").write_text(json.dumps(quadratic))
    report.main(["--results", str(tmp_path / "bench.json"), "--out", str(out), "--analysis", "none",
                 "--quadratic", str(tmp_path / "quadratic.json")])
    text = out.read_text()
    assert "| 8 | 64 | True | 4,096 | fwd+bwd | 2.000 | 4.000 | 2.500 | 0.80 |  |  |" in text
    assert "| 1 | 64 | True | 4,096 | fwd | 0.500 | – | 0.250 | 2.00 | 1.500 | 3.00 |" in text
    assert "| 128 | 8,192 | 4.00 | 5.00 | – | – |" in text and "| 64 | 4,096 | 1.00 |" not in text


def test_benchmarks_md_is_the_report_of_the_results_and_analysis(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the defaults are repository paths
    report.main(["--out", str(tmp_path / "BENCHMARKS.md"), "--plots", str(tmp_path)])
    made = (tmp_path / "BENCHMARKS.md").read_text()
    for name in ("long_context.png", "crossover.png"):
        made = made.replace(f"]({name})", f"](benchmarks/h200/kernels/{name})")
    assert made == (ROOT / "BENCHMARKS.md").read_text(), \
        "BENCHMARKS.md differs from tools/report_benchmarks.py's rendering: edit benchmarks/analysis.md and rerun it"


# --------------------------------------------------------------------------- finetune_experiment


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """finetune.py arguments of a tiny GQA Llama on 32-token blocks of 150 stdlib files."""
    return ["--model", "llama-tiny", "--vocab_size", "512", "--max_files", "150", "--seq_len", "32",
            "--batch_size", "4", "--eval_blocks", "16", "--cache_dir", str(tmp_path_factory.mktemp("fastmax_cache")),
            "--mixed_precision", "no"]


def test_finetune_experiment_runs_at_a_tiny_scale(tmp_path, tiny):
    # the same script the GPU run uses, shrunk: summary.json and the perplexity plot come out
    script = TOOLS / "finetune_experiment.py"
    shared = [a for a in tiny if a not in ("--model", "llama-tiny", "--seq_len", "32", "--batch_size", "4",
                                           "--mixed_precision", "no", "--eval_blocks", "16")]
    cmd = [sys.executable, str(script), "--out_dir", str(tmp_path), "--model", "llama-tiny", "--seq_len", "32",
           "--batch_size", "4", "--convert_batch_size", "4", "--pretrain_steps", "20", "--eval_blocks", "8",
           "--mixed_precision", "no",
           "--window", "8", "--runs", "teacher,swap,distill,distill_window", "--finetune_args", " ".join(shared)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["runs"]) == {"teacher", "swap", "distill", "distill_window"}
    assert summary["runs"]["distill"]["tokens_over_teacher"] == pytest.approx(0.1)
    assert summary["runs"]["distill_window"]["tokens"] == summary["runs"]["distill"]["tokens"]
    saved = json.loads((tmp_path / "distill_window" / "config.json").read_text())
    assert saved["fastmax"]["window"] == 8  # the window reached the converted model's config
    assert summary["runs"]["teacher"]["ppl_over_teacher"] == 1.0
    assert set(summary["targets"]) == {"distill_within_10_percent_of_teacher", "distill_tokens_at_most_10_percent",
                                       "distill_better_than_swap", "window_closes_half_of_distill_gap",
                                       "window_at_most_1_17_of_teacher"}
    assert summary["meta"]["kernel_settings"] == dataclasses.asdict(kernels.KernelSettings())
    assert (tmp_path / "perplexity.png").is_file()
    assert "| distill | fastmax |" in (tmp_path / "summary.md").read_text()
    assert "| distill_window | fastmax, window 8 |" in (tmp_path / "summary.md").read_text()


def test_finetune_experiment_keeps_the_conversion_token_budget_at_a_smaller_batch():
    def budget(run, argv):
        args = experiment.parse_args(["--out_dir", "unused", "--pretrain_steps", "900", *argv])
        command = experiment.plan(args)[run]
        value = lambda flag: int(command[command.index(flag) + 1])  # noqa: E731
        return value("--per_device_train_batch_size") * value("--max_train_steps"), value("--max_train_steps")

    teacher_tokens = 32 * 900  # blocks
    for run in ("swap", "swap_kd", "distill", "distill_window"):
        tokens, steps = budget(run, [])  # 8 blocks per step
        assert (tokens, steps) == (teacher_tokens // 10, 360)
        tokens, steps = budget(run, ["--convert_batch_size", "32"])
        assert (tokens, steps) == (teacher_tokens // 10, 90)
    assert experiment.FINETUNE == ROOT / "scripts" / "finetune.py" and experiment.FINETUNE.is_file()


# --------------------------------------------------------------------------- the documents' paths

TOP = ("benchmarks", "docs", "fastmax_hf", "kernels", "scripts", "tests", "tools")
DOCUMENTS = ["README.md", "BENCHMARKS.md", "tools/README.md", *sorted(str(p.relative_to(ROOT)) for p in
             [*(ROOT / "docs").rglob("*.md"), *(ROOT / "benchmarks").rglob("*.md")])]
RESULT_SUFFIXES = (".json", ".txt", ".log", ".csv", ".png", ".md")


def cited_paths(document: str) -> list[tuple[str, str]]:
    """(kind, path) cited by a markdown file: links, repository paths in the text, and, in the
    benchmark documents, code spans that name a folder or result file inside benchmarks/."""
    path = ROOT / document
    text = path.read_text()
    cited = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if not re.match(r"[a-z]+:|#", target):
            cited.append(("link", (path.parent / target.split("#")[0]).resolve().relative_to(ROOT).as_posix()))
    for word in re.findall(rf"(?<![\w/.-])((?:{'|'.join(TOP)})/[\w./*<>:-]*)", text):
        word = word.split("::")[0].rstrip(".,:;")
        if "<" not in word and "..." not in word:
            cited.append(("repo", word))
    if document == "BENCHMARKS.md" or document.startswith("benchmarks/"):
        for span in re.findall(r"`([^`\s]+)`", text):
            if not span.startswith(TOP) and (span.endswith("/") or span.endswith(RESULT_SUFFIXES)) and "<" not in span:
                cited.append(("results", span))
    return cited


def exists(kind: str, cited: str) -> bool:
    if kind in ("link", "repo"):
        return any(ROOT.glob(cited.rstrip("/"))) if "*" in cited else (ROOT / cited).exists()
    tails = [p.relative_to(ROOT / "benchmarks").as_posix() for p in (ROOT / "benchmarks").rglob("*")]
    pattern = cited.rstrip("/")
    return any(fnmatch.fnmatch(tail, pattern) or fnmatch.fnmatch(tail, "*/" + pattern) for tail in tails)


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_repository_path_a_document_cites_exists(document):
    cited = cited_paths(document)
    assert cited or document.startswith("docs/")
    missing = [f"{kind}: {p}" for kind, p in cited if not exists(kind, p)]
    assert not missing, f"{document} cites paths that do not exist: {missing}"


def test_tools_readme_lists_every_tool():
    listed = set(re.findall(r"^\| `([\w.]+)` \|", (TOOLS / "README.md").read_text(), flags=re.M))
    present = {p.name for p in TOOLS.iterdir() if p.suffix in (".py", ".sh")}
    assert listed == present
