"""Host time of the calls a training step is made of (GPU): what the CPU spends to queue each one.

bench/profile_step.py found the step host-bound on some H100 hosts (GPU busy 1,285 ms of a 1,998 ms
step). This times, with the GPU held in a sleep kernel so that no call waits for it
(bench/queued_timing.py), the host microseconds per call of the pieces of one LoRA projection at the
Llama-3-8B q_proj size (NF4 4096 x 4096, 2 x 2048 tokens, bf16 autocast, r = 32) and of the other
kernels' launches, from a bare cuBLAS call up to lora_linear's forward and forward + backward.

    python bench/host_costs.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from lora_kernels import nf4_base  # noqa: E402
from queued_timing import queued_call_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # calls per timing round: few enough that the queued kernels stay under the launch queue's depth (about
    # a thousand), or queueing would block on the sleeping GPU and count its time
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--json")
    args = ap.parse_args()
    from trainer.kernels import rms_norm as rms_norm_kernel
    from trainer.kernels.lora_fused import LoRALinearFunction, cached_factor_casts, dense_weight, lora_linear
    from trainer.kernels.lora_projection import _plan, _project
    from trainer.kernels.nf4 import dequantize_nf4
    from trainer.lora import LoRALinear

    dev, dt = torch.device("cuda"), torch.bfloat16
    n, h, r = 4096, 4096, 32
    base = nf4_base(h, h, dev)  # bf16 compute, as in bench/lora_kernels.py
    lora = LoRALinear(base, r, float(r)).to(dev)
    A, B = lora.lora_A.weight, lora.lora_B.weight
    x = torch.randn(n, h, device=dev, dtype=dt, requires_grad=True)
    dense = torch.randn(h, h, device=dev, dtype=dt)
    y = torch.empty(n, h, device=dev, dtype=dt)
    out = torch.empty(h, h, device=dev, dtype=dt)
    norm_w = torch.ones(h, device=dev, dtype=dt)
    qs = base.weight.quant_state
    dy = torch.randn(n, h, device=dev, dtype=dt)

    a16, b16 = A.detach().to(dt), B.detach().to(dt)
    xa = torch.empty(n, r, device=dev, dtype=dt)
    with torch.autocast("cuda", dtype=dt):
        plan = _plan(dt, "cuda", base, A)

    def apply_no_grad():
        with torch.no_grad(), torch.autocast("cuda", dtype=dt):
            LoRALinearFunction.apply(x, A, B, base, 1.0, plan)

    def fwd_bwd():
        with torch.autocast("cuda", dtype=dt):
            out_ = lora_linear(x, base, A, B, 1.0)
        out_.backward(dy)

    def fwd():
        with torch.no_grad(), torch.autocast("cuda", dtype=dt):
            lora_linear(x, base, A, B, 1.0)

    def autocast_off():
        with torch.autocast("cuda", enabled=False):
            pass

    from trainer.kernels import nf4 as nf4_module
    from trainer.kernels.triton_math import cdiv

    s2 = qs.state2
    code = nf4_module._code("nf4", dev)
    raw_args = (base.weight, qs.absmax, code, s2.code, s2.absmax, qs.offset, out, out.numel(), cdiv(out.numel(), 64))

    def raw_nf4_launch():  # the jit launch alone, with the arguments dequantize_nf4 computes per call
        nf4_module._dequantize_4bit[(cdiv(raw_args[-1], 64),)](*raw_args, BLOCKSIZE=64, BLOCKSIZE2=s2.blocksize,
                                                                 ROWS=64, NESTED=True, BF16_BY_BITS=False,
                                                                 num_warps=4, enable_fp_fusion=False)

    cases = [
        ("torch.mm into out (one cuBLAS launch)", lambda: torch.mm(x.detach(), dense.t(), out=y)),
        ("y.mul_(1.0) (one elementwise launch)", lambda: y.mul_(1.0)),
        ("Triton jit launch of the NF4 kernel alone", raw_nf4_launch),
        ("y.addmm_ (one cuBLAS launch)", lambda: y.addmm_(x.detach(), dense.t())),
        ("x A^T (N x 4096 x 32 mm)", lambda: torch.mm(x.detach(), a16.t(), out=xa)),
        ("y.addmm_(xa, B^T, beta=0) (K = 32)", lambda: y.addmm_(xa, b16.t(), beta=0, alpha=1.0)),
        ("_project (dense_weight + 3 products)", lambda: _project(x.detach(), base, A, B, 1.0, plan)),
        ("LoRALinearFunction.apply, no grad", lambda: apply_no_grad()),
        ("torch.empty 4096 x 4096", lambda: torch.empty(n, h, device=dev, dtype=dt)),
        ("torch.autocast(enabled=False) enter + exit", autocast_off),
        ("dequantize_nf4 (one Triton launch)", lambda: dequantize_nf4(base.weight, qs, out)),
        ("dense_weight (NF4 -> bf16 workspace)", lambda: dense_weight(base, dt)),
        ("rms_norm forward (Triton)", lambda: rms_norm_kernel(x.detach(), norm_w, 1e-5)),
        ("lora_linear forward, no grad", fwd),
        ("lora_linear forward + backward", fwd_bwd),
    ]
    rows = []
    print(f"{torch.cuda.get_device_name()}; host us per call (GPU held in a sleep kernel while they queue)")
    with cached_factor_casts():
        for name, fn in cases:
            gpu_ms, host_ms = queued_call_ms(fn, dev, args.iters)
            rows.append({"call": name, "host_us": host_ms * 1e3, "gpu_us": gpu_ms * 1e3})
            print(f"{name:<46}{host_ms * 1e3:>9.1f}")
            x.grad = None
            A.grad = B.grad = None
    if args.json:
        Path(args.json).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
