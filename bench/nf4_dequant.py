"""NF4 -> bf16 dequantization of one weight matrix at the Llama-3-8B sizes: bitsandbytes' three-step path
(as trainer.kernels.lora_fused.dense_weight did it before trainer/kernels/nf4.py), bitsandbytes' 4-bit
kernel alone, and the one-launch Triton kernel (trainer.kernels.nf4.dequantize_nf4).

    python bench/nf4_dequant.py [--shapes 4096x4096,1024x4096,14336x4096,4096x14336] [--dtype bf16]
                                [--blocksize 64] [--no-sweep] [--json out.json]

Needs a CUDA GPU (`--device cpu --shapes 96x80` with TRITON_INTERPRET=1 only checks that it runs).

Weights are quantized as trainer.models.load_model does it: NF4, double quantization (uint8 absmax codes
in blocks of 256 with a float32 offset), blocksize 64. Implementations, each writing into one
preallocated [out, in] tensor:

    three-step  absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset (two kernels and an
                allocation), then torch.ops.bitsandbytes.dequantize_4bit.out(w, absmax.float(), ...)
    bnb-4bit    torch.ops.bitsandbytes.dequantize_4bit.out with the float32 absmax computed beforehand
                (what the first two steps cost is the difference to three-step)
    triton      dequantize_nf4(w, qs, out): one launch reading the absmax codes itself

Columns: `GPU us` is GPU time alone per call: 40 calls are queued while the GPU sits in a
torch.cuda._sleep kernel, then run back to back between two CUDA events (median of 5), so launch gaps do
not count; `host us` is the CPU time to queue one call (Python, dispatch, launches) measured in the same
loop, which is what a training step pays when the GPU waits on the CPU; `GB/s` = the bytes the operation
must move / GPU time, counted the same for every implementation: packed codes (n/2) + absmax codes
(n/64) + state2's float32 absmax, read, and n x 2 bytes of bf16 written (the three-step path moves more:
it writes and re-reads a float32 absmax twice). `copy` is a device-to-device copy of 1 GiB in the same
run, the bandwidth ceiling. `exact` says whether the output equals three-step's bit for bit.

The sweep table times the Triton kernel at other launch shapes (output elements per program, warps) on
the largest matrix; the defaults in trainer/kernels/nf4.py are _ELEMENTS and _WARPS.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from queued_timing import queued_call_ms  # noqa: E402

from trainer.kernels import nf4  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CALLS = 40


@dataclass
class Row:
    shape: str
    impl: str
    gpu_us: float
    host_us: float
    bytes_moved: int
    exact: bool


def time_calls(fn: Callable[[], object], dev: torch.device) -> tuple[float, float]:
    """(GPU us per call with the calls queued back to back, host us to queue one call), medians of 5."""
    gpu_ms, host_ms = queued_call_ms(fn, dev, CALLS)
    return gpu_ms * 1e3, host_ms * 1e3


def copy_ceiling(dev: torch.device) -> float:
    """Device-to-device copy rate in GB/s (read + write) of 1 GiB."""
    n = 2**29 if dev.type == "cuda" else 2**20
    a, b = torch.empty(n, dtype=torch.bfloat16, device=dev), torch.empty(n, dtype=torch.bfloat16, device=dev)
    us, _ = time_calls(lambda: b.copy_(a), dev)
    return 2 * a.numel() * a.element_size() / us / 1e3


def quantized(n_out: int, n_in: int, dtype: torch.dtype, blocksize: int, dev: torch.device):
    """(packed weight, quant state) of a random [n_out, n_in] matrix, NF4 with double quantization."""
    import bitsandbytes.functional as bnbf

    x = torch.randn(n_out, n_in, device=dev, dtype=dtype) * n_in**-0.5
    return bnbf.quantize_4bit(x, blocksize=blocksize, compress_statistics=True, quant_type="nf4")


def bnb_4bit(w: torch.Tensor, absmax: torch.Tensor, qs, out: torch.Tensor) -> torch.Tensor:
    args = (w, absmax, qs.blocksize, qs.quant_type, list(qs.shape), out.dtype)
    if w.is_cuda:
        torch.ops.bitsandbytes.dequantize_4bit.out(*args, out=out)
    else:  # bitsandbytes has no CPU kernel writing into a given tensor
        out.copy_(torch.ops.bitsandbytes.dequantize_4bit.default(*args))
    return out


def three_step(w: torch.Tensor, qs, out: torch.Tensor) -> torch.Tensor:
    import bitsandbytes.functional as bnbf

    absmax = bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    return bnb_4bit(w, absmax.float(), qs, out)


def bench_shape(shape: str, dtype: torch.dtype, blocksize: int, dev: torch.device, rows: list[Row]) -> None:
    import bitsandbytes.functional as bnbf

    n_out, n_in = (int(v) for v in shape.split("x"))
    w, qs = quantized(n_out, n_in, dtype, blocksize, dev)
    n = n_out * n_in
    moved = n // 2 + qs.absmax.numel() + 4 * qs.state2.absmax.numel() + n * dtype.itemsize
    absmax = (bnbf.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).float()
    out = torch.empty(n_out, n_in, device=dev, dtype=dtype)
    expected = three_step(w, qs, out).clone()
    impls = {"three-step": lambda: three_step(w, qs, out), "bnb-4bit": lambda: bnb_4bit(w, absmax, qs, out),
             "triton": lambda: nf4.dequantize_nf4(w, qs, out)}
    for impl, call in impls.items():
        out.fill_(float("nan"))
        exact = torch.equal(call(), expected)
        gpu_us, host_us = time_calls(call, dev)
        rows.append(Row(shape, impl, gpu_us, host_us, moved, exact))
        print(f"  {shape:11s} {impl:10s} GPU {gpu_us:9.1f} us  host {host_us:7.1f} us  "
              f"{moved / gpu_us / 1e3:6.0f} GB/s  exact {exact}", flush=True)


def sweep(shape: str, dtype: torch.dtype, blocksize: int, dev: torch.device) -> list[tuple[int, int, float]]:
    """(elements per program, warps, GPU us) of the Triton kernel at several launch shapes."""
    n_out, n_in = (int(v) for v in shape.split("x"))
    w, qs = quantized(n_out, n_in, dtype, blocksize, dev)
    out = torch.empty(n_out, n_in, device=dev, dtype=dtype)
    expected = nf4.dequantize_nf4(w, qs, torch.empty_like(out))
    results = []
    for elements in (1024, 2048, 4096, 8192, 16384):
        for warps in (2, 4, 8, 16):
            def call(elements=elements, warps=warps):
                return nf4.dequantize_nf4(w, qs, out, elements_per_program=elements, num_warps=warps)

            assert torch.equal(call(), expected), (elements, warps)
            gpu_us, _ = time_calls(call, dev)
            results.append((elements, warps, gpu_us))
            print(f"  sweep {shape} elements {elements:6d} warps {warps:2d}  GPU {gpu_us:9.1f} us", flush=True)
    return results


def render(rows: list[Row], ceiling: float, sweep_rows: list[tuple[int, int, float]], sweep_shape: str,
           sweep_bytes: int) -> str:
    out = [f"copy ceiling: {ceiling:.0f} GB/s (1 GiB device-to-device, same run)", "",
           "| shape [out x in] | impl | GPU us | vs three-step | host us | GB/s | % of copy | exact |",
           "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    first: dict[str, Row] = {}
    for r in rows:
        base = first.setdefault(r.shape, r)
        rate = r.bytes_moved / r.gpu_us / 1e3
        out.append(f"| {r.shape} | {r.impl} | {r.gpu_us:.1f} | {base.gpu_us / r.gpu_us:.2f}x | {r.host_us:.1f} "
                   f"| {rate:.0f} | {100 * rate / ceiling:.0f}% | {r.exact} |")
    if sweep_rows:
        out += ["", f"Triton kernel launch shapes on {sweep_shape} "
                    f"(defaults: {nf4._ELEMENTS} elements, {nf4._WARPS} warps)", "",
                "| elements/program | warps | GPU us | GB/s |", "| ---: | ---: | ---: | ---: |"]
        out += [f"| {e} | {w} | {us:.1f} | {sweep_bytes / us / 1e3:.0f} |" for e, w, us in sweep_rows]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,1024x4096,14336x4096,4096x14336")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--blocksize", type=int, default=64)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dev = torch.device(args.device)
    assert dev.type != "cuda" or torch.cuda.is_available(), "bench/nf4_dequant.py needs a CUDA GPU"
    import bitsandbytes
    import triton

    torch.manual_seed(0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"bitsandbytes {bitsandbytes.__version__}")
    dtype = DTYPES[args.dtype]
    ceiling = copy_ceiling(dev)
    rows: list[Row] = []
    shapes = args.shapes.split(",")
    for shape in shapes:
        bench_shape(shape, dtype, args.blocksize, dev, rows)
    largest = max(shapes, key=lambda s: next(r.bytes_moved for r in rows if r.shape == s))
    sweep_rows = [] if args.no_sweep else sweep(largest, dtype, args.blocksize, dev)
    sweep_bytes = next(r.bytes_moved for r in rows if r.shape == largest)
    print(render(rows, ceiling, sweep_rows, largest, sweep_bytes))
    if args.json:
        args.json.write_text(json.dumps({"copy_GBs": ceiling, "rows": [asdict(r) for r in rows],
                                         "sweep": [dict(elements=e, warps=w, gpu_us=us) for e, w, us in sweep_rows]},
                                        indent=1))


if __name__ == "__main__":
    main()
