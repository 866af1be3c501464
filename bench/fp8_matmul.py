"""FP8 against bf16 for the frozen base products of one decoder layer (Llama-3-8B sizes), forward and input gradient.

For each projection at 4,096 tokens: the bf16 product (what the trainer runs now), the FP8 product alone
(torch._scaled_mm, e4m3 operands with row-wise float32 scales) and the FP8 product with the casts it needs
(the activation or output gradient scaled per row and cast; the weight cast from bf16, per-tensor scale, and
for the input gradient transposed, since _scaled_mm wants its second operand column-major). Also each
result's error against float64: relative Frobenius norm of the difference.

    python bench/fp8_matmul.py [--tokens 4096] [--json out.json]

A second table times the trainer's own pieces (needs bitsandbytes): the NF4 weight dequantized to bf16 and to
e4m3, fp8.quantize_rows, and a whole LoRA projection's forward with and without --fp8.

The GPU runs each product back to back for a second before timing, so the clock is where a training step
holds it (power-capped on the H100, bench/KERNEL_NOTES.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max
SHAPES = {"q/o (4096 x 4096)": (4096, 4096), "k/v (1024 x 4096)": (1024, 4096),
          "gate/up (14336 x 4096)": (14336, 4096), "down (4096 x 14336)": (4096, 14336)}


def rowwise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(t / s cast to e4m3, s [rows, 1] float32) with s = the row's largest magnitude / 448."""
    s = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / E4M3_MAX
    return (t / s).to(E4M3), s


def tensorwise(w: torch.Tensor, transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:
    s = w.abs().amax().float().clamp(min=1e-12) / E4M3_MAX
    q = (w * (1 / s)).to(E4M3)
    return (q.t().contiguous() if transpose else q), s


def timed(fn, reps: int = 40) -> float:
    """Median milliseconds per call after a second of back-to-back calls."""
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    for _ in range(max(1, int(1000 / max(start.elapsed_time(end), 1e-3)))):
        fn()
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref).norm() / ref.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU with FP8 matmuls (Hopper or later)")
    torch.manual_seed(0)
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        x = torch.randn(args.tokens, in_f, device="cuda", dtype=torch.bfloat16)
        dy = torch.randn(args.tokens, out_f, device="cuda", dtype=torch.bfloat16) * 1e-3
        w = (torch.randn(out_f, in_f, device="cuda") * in_f ** -0.5).to(torch.bfloat16)
        ones_out = torch.ones(1, out_f, device="cuda")
        ones_in = torch.ones(1, in_f, device="cuda")
        w8, x8, wt8, dy8 = tensorwise(w, False), rowwise(x), tensorwise(w, True), rowwise(dy)

        def fwd_fp8(cast: bool, x=x, w=w, ones_out=ones_out, w8=w8, x8=x8):
            xq, xs = rowwise(x) if cast else x8
            wq, ws = tensorwise(w, False) if cast else w8
            return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ones_out * ws, out_dtype=torch.bfloat16)

        def bwd_fp8(cast: bool, dy=dy, w=w, ones_in=ones_in, wt8=wt8, dy8=dy8):
            dq, ds = rowwise(dy) if cast else dy8
            wq, ws = tensorwise(w, True) if cast else wt8
            return torch._scaled_mm(dq, wq.t(), scale_a=ds, scale_b=ones_in * ws, out_dtype=torch.bfloat16)

        ref_f, ref_b = x.double() @ w.double().t(), dy.double() @ w.double()
        row = {
            "projection": name,
            "fwd bf16 ms": timed(lambda x=x, w=w: torch.mm(x, w.t())),
            "fwd fp8 ms": timed(lambda: fwd_fp8(False)),
            "fwd fp8+casts ms": timed(lambda: fwd_fp8(True)),
            "dx bf16 ms": timed(lambda dy=dy, w=w: torch.mm(dy, w)),
            "dx fp8 ms": timed(lambda: bwd_fp8(False)),
            "dx fp8+casts ms": timed(lambda: bwd_fp8(True)),
            "fwd err bf16": rel_err(torch.mm(x, w.t()), ref_f),
            "fwd err fp8": rel_err(fwd_fp8(True), ref_f),
            "dx err bf16": rel_err(torch.mm(dy, w), ref_b),
            "dx err fp8": rel_err(bwd_fp8(True), ref_b),
        }
        rows.append(row)
        print(" | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    table(rows)
    kernel_rows = ours(args.tokens)
    table(kernel_rows)
    if args.json:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens}
        with open(args.json, "w") as f:
            json.dump({**meta, "rows": rows, "ours": kernel_rows}, f, indent=2)


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else r[k] for k in keys) + " |")


def ours(tokens: int) -> list[dict]:
    """The trainer's own pieces on an NF4 weight (bitsandbytes, double-quantized, blocksize 64): dequantizing
    to bf16 (what the bf16 path does) and to e4m3 with row scales (--fp8), quantize_rows of the input, and a
    whole LoRA projection's forward (r = 32, bf16 autocast) both ways."""
    import bitsandbytes as bnb
    from torch import nn

    from trainer.kernels.fp8 import quantize_rows
    from trainer.kernels.lora_fused import dense_weight, fp8_weight, lora_linear
    from trainer.lora import LoRALinear

    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        lin = nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        q = bnb.nn.Linear4bit(in_f, out_f, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                              compress_statistics=True)
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4",
                                     compress_statistics=True)
        q = q.cuda().requires_grad_(False)
        m = LoRALinear(q, 32, 32.0).cuda()
        x = torch.randn(tokens, in_f, device="cuda", dtype=torch.bfloat16)

        def forward(fp8: bool, m=m, x=x):
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                return lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling, fp8=fp8)

        row = {"projection": name,
               "nf4 -> bf16 ms": timed(lambda q=q: dense_weight(q, torch.bfloat16)),
               "nf4 -> e4m3 ms": timed(lambda q=q: fp8_weight(q)),
               "quantize_rows(x) ms": timed(lambda x=x: quantize_rows(x)),
               "LoRA fwd bf16 ms": timed(lambda: forward(False)),
               "LoRA fwd fp8 ms": timed(lambda: forward(True))}
        rows.append(row)
        print(" | ".join(f"{k}: {v:.4g}" if isinstance(v, float) else str(v) for k, v in row.items()), flush=True)
    return rows


if __name__ == "__main__":
    main()
