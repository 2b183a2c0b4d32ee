"""Peak memory and time of 1M-token causal Fastmax training on one GPU, by head-group budget.

    python scripts/trace_memory.py            # writes to stdout (benchmarks/results/memory_1m_h100.txt)

B=1, H=16, N=1048576, bf16, the linear kernels, forward+backward, D=64 and 128. For each
setting of the backward's scratch budget (kernels/ops.py: SCRATCH_FRACTION, SCRATCH_MIN_BYTES)
the run is repeated (the first includes compilation) and the peak is reported against the
size of q, k, v, o and their gradients, with memory_allocated / max_memory_allocated traced
at the backward's stages.
"""

import time

import torch

from fastmax_hf.kernels import ops

GiB = 2**30


def mem(tag):
    torch.cuda.synchronize()
    print(f"  {tag:22s} alloc {torch.cuda.memory_allocated() / GiB:6.2f}  max {torch.cuda.max_memory_allocated() / GiB:6.2f}",
          flush=True)


def traced(name, fn):
    def wrapper(*args, **kwargs):
        mem(f"{name} in")
        result = fn(*args, **kwargs)
        mem(f"{name} out")
        return result
    return wrapper


def main():
    ops._row_terms = traced("row_terms", ops._row_terms)
    ops.linear_backward = traced("linear_backward", ops.linear_backward)
    N, H = 1 << 20, 16
    for D in (64, 128):
        for fraction, min_gib in ((0.2, 3), (0.1, 2)):
            ops.SCRATCH_FRACTION, ops.SCRATCH_MIN_BYTES = fraction, min_gib * GiB
            q, k, v = [torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
            grad_out = torch.randn(1, H, N, D, device="cuda", dtype=torch.bfloat16)
            io = 8 * q.numel() * q.element_size()  # q, k, v, o and their gradients
            for repetition in range(2):
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()  # q, k, v, grad_out
                start = time.perf_counter()
                out, _ = ops.triton_attention(q, k, v, causal=True, key_padding_mask=None, scale=D ** -0.5,
                                              p=2, a0=1.0, a1=1.0, a2=0.5, regime="linear")
                mem("after forward")
                out.backward(grad_out)
                torch.cuda.synchronize()
                ms = (time.perf_counter() - start) * 1e3
                total = torch.cuda.max_memory_allocated() - base + 4 * q.numel() * q.element_size()
                print(f"D={D} SCRATCH_FRACTION={fraction} SCRATCH_MIN_BYTES={min_gib}GiB "
                      f"heads/launch={ops._heads_per_launch(q, k, v)} repetition {repetition}: {ms:.0f} ms, "
                      f"peak total {total / GiB:.2f} GiB = {total / io:.3f} x io", flush=True)
                for x in (q, k, v):
                    x.grad = None
                del out
            del q, k, v, grad_out


if __name__ == "__main__":
    main()
