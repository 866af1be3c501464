"""LoRA-fused projections (trainer/kernels/lora_fused.py) against LoRALinear's plain path, per projection
kind and for the whole MLP block, at the Llama-3-8B and Gemma-7B sizes: NF4 base (double quantization,
bf16 compute, as trainer.models.load_model loads it), bf16 autocast, LoRA r = 32, 2 x 2048 tokens.

    python bench/lora_kernels.py [--shapes llama3-8b,gemma-7b] [--tokens 4096] [--rank 32] [--json out.json]

Needs a CUDA GPU (`--device cpu --shapes tiny` with TRITON_INTERPRET=1 only checks that it runs).

Implementations: `plain` is LoRALinear's unfused forward (bitsandbytes matmul_4bit + lora_delta) and,
for the MLP, the decoder's composition with ops.gated_activation (the Triton kernel on CUDA);
`fused` is lora_linear per projection (for the MLP: three lora_linear calls around the same gated
activation); `mlp` is lora_mlp, which recomputes gate/up in backward; `mlp-keep` is lora_mlp with
recompute=False. `dequant` rows time the NF4 -> bf16 dequantization of one matrix alone:
bitsandbytes' allocating call against dense_weight's write into the shared workspace.

Columns: fwd and fwd+bwd are GPU time alone (calls queued behind a sleep kernel, so no launch gaps,
as in a training step where the CPU runs ahead), median of 5 x 20 calls; `TFLOP/s` counts the base
products only (forward x W^T and backward dY W: 4 x tokens x in x out per projection; a recompute is
not counted, so it shows as a lower rate) against the bf16 matmul ceiling measured in the same run;
`held MB` is what stays allocated between forward and backward (saved for backward, plus the
output), i.e. what each layer keeps without gradient checkpointing; `peak MB` is the peak of one
fwd+bwd above the inputs, the fused path's workspace included (it is dropped before the
measurement); `rel err` is ||out - plain|| / ||plain|| of the forward output.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from queued_timing import queued_call_ms, sync  # noqa: E402

from trainer.kernels.lora_fused import clear_workspaces, dense_weight, lora_mlp  # noqa: E402
from trainer.lora import LoRALinear  # noqa: E402
from trainer.models import ops  # noqa: E402
from trainer.options import ModelOptions  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, act="silu"),
    "gemma-7b": dict(hidden=3072, inter=24576, heads=16, kv=16, head_dim=256, act="gelu_tanh"),
    "tiny": dict(hidden=64, inter=160, heads=4, kv=2, head_dim=16, act="silu"),
}
DTYPE = torch.bfloat16


@dataclass
class Row:
    block: str
    shape: str
    impl: str
    fwd_ms: float
    fwd_bwd_ms: float
    flop_fwd_bwd: float  # base products of fwd + bwd (dequant rows: bytes moved)
    held_mb: float | None
    peak_mb: float | None
    rel_err: float


def _median_ms(fn: Callable[[], object], dev: torch.device, iters: int = 20) -> float:
    """Per-call time of `iters` calls queued back to back (GPU time alone on CUDA), median of 5."""
    return queued_call_ms(fn, dev, iters)[0]


def _memory(fwd: Callable[[], torch.Tensor], bwd: Callable[[torch.Tensor], object],
            dev: torch.device) -> tuple[float | None, float | None]:
    """(MB held between forward and backward, peak MB of fwd+bwd with the workspace re-created), each
    above what was allocated before."""
    if dev.type != "cuda":
        return None, None
    sync(dev)
    before = torch.cuda.memory_allocated(dev)
    out = fwd()
    sync(dev)
    held = torch.cuda.memory_allocated(dev) - before
    bwd(out)
    del out
    clear_workspaces()
    sync(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    bwd(fwd())
    sync(dev)
    return held / 2**20, (torch.cuda.max_memory_allocated(dev) - before) / 2**20


def nf4_base(n_in: int, n_out: int, dev: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    w = torch.randn(n_out, n_in, device=dev, dtype=DTYPE) * n_in**-0.5
    q = bnb.nn.Linear4bit(n_in, n_out, bias=False, compute_dtype=DTYPE, compress_statistics=True,
                          quant_type="nf4", device="meta")
    q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True,
                                 module=q).to(dev)
    return q


def adapted(n_in: int, n_out: int, rank: int, dev: torch.device) -> LoRALinear:
    m = LoRALinear(nf4_base(n_in, n_out, dev), rank, alpha=16)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, 0.01)
    return m


def _measure(block: str, shape: str, impls: dict[str, Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor,
             n_out: int, params: list[torch.Tensor], flop: float, dev: torch.device, rows: list[Row]) -> None:
    dy = torch.randn(*x.shape[:-1], n_out, device=dev, dtype=DTYPE)
    ref = None
    for impl, call in impls.items():
        def fwd(call=call) -> torch.Tensor:
            with torch.autocast(dev.type, dtype=DTYPE):
                return call(x)

        def bwd(out: torch.Tensor) -> None:
            torch.autograd.grad(out, params, dy)

        def no_grad_fwd(fwd=fwd) -> None:
            with torch.no_grad():
                fwd()

        out = fwd()
        if ref is None:
            ref = out.detach().float()
        err = ((out.detach().float() - ref).norm() / ref.norm()).item()
        bwd(out)
        del out
        fwd_ms = _median_ms(no_grad_fwd, dev)
        fwd_bwd_ms = _median_ms(lambda fwd=fwd: bwd(fwd()), dev)
        held, peak = _memory(fwd, bwd, dev)
        rows.append(Row(block, shape, impl, fwd_ms, fwd_bwd_ms, flop, held, peak, err))
        print(f"  {block:8s} {shape:10s} {impl:9s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fwd_bwd_ms:8.3f} ms  "
              f"held {held or 0:7.0f} MB  peak {peak or 0:7.0f} MB  rel err {err:.1e}", flush=True)


def bench_shape(name: str, tokens: int, rank: int, dev: torch.device, rows: list[Row]) -> None:
    s = SHAPES[name]
    h, inter = s["hidden"], s["inter"]
    projections = {"q/o": (h, s["heads"] * s["head_dim"]), "k/v": (h, s["kv"] * s["head_dim"]),
                   "gate/up": (h, inter), "down": (inter, h)}
    for block, (n_in, n_out) in projections.items():
        m = adapted(n_in, n_out, rank, dev)
        x = torch.randn(2, tokens // 2, n_in, device=dev, dtype=DTYPE, requires_grad=True)

        plain, fused = m.rebuilt(ModelOptions(kernels="off")), m.rebuilt(ModelOptions(kernels="auto"))
        _measure(block, name, {"plain": plain, "fused": fused}, x, n_out, [x, m.lora_A.weight, m.lora_B.weight],
                 4.0 * tokens * n_in * n_out, dev, rows)
        del m, x

    gate, up, down = adapted(h, inter, rank, dev), adapted(h, inter, rank, dev), adapted(inter, h, rank, dev)
    mods = (gate, up, down)
    x = torch.randn(2, tokens // 2, h, device=dev, dtype=DTYPE, requires_grad=True)

    # the same weights built with the kernels off (LoRALinear's plain path) and on (lora_linear per projection)
    paths = {kernels: [m.rebuilt(ModelOptions(kernels=kernels)) for m in mods] for kernels in ("off", "auto")}

    def composed(x, kernels: str):
        g, u, d = paths[kernels]
        return d(ops.gated_activation(g(x), u(x), s["act"], kernel=x.is_cuda))

    impls = {"plain": lambda x: composed(x, "off"), "fused": lambda x: composed(x, "auto"),
             "mlp": lambda x: lora_mlp(x, gate, up, down, s["act"]),
             "mlp-keep": lambda x: lora_mlp(x, gate, up, down, s["act"], recompute=False)}
    params = [x] + [p for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]
    _measure("mlp", name, impls, x, h, params, 4.0 * tokens * 3 * h * inter, dev, rows)

    # NF4 -> bf16 dequantization of the gate matrix: read 4-bit codes + 8-bit absmax, write bf16
    import bitsandbytes.functional as bnbf

    w = gate.base_layer.weight
    moved = inter * h * (0.5 + 2) + inter * h / 64
    for impl, call in {"bnb": lambda: bnbf.dequantize_4bit(w, w.quant_state),
                       "workspace": lambda: dense_weight(gate.base_layer, DTYPE)}.items():
        ms = _median_ms(call, dev)
        rows.append(Row("dequant", name, impl, ms, ms, moved, None, None, 0.0))
        print(f"  dequant  {name:10s} {impl:9s} {ms:8.3f} ms  {moved / ms / 1e6:6.0f} GB/s", flush=True)


def matmul_ceiling(dev: torch.device) -> float:
    """Measured bf16 matmul rate (TFLOP/s) on random 8192^3 data."""
    n = 8192 if dev.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=dev, dtype=DTYPE) for _ in range(2))
    return 2 * n**3 / _median_ms(lambda: a @ b, dev) / 1e9


def render(rows: list[Row], ceiling: float) -> str:
    out = [f"bf16 matmul ceiling: {ceiling:.0f} TFLOP/s (8192^3, same run)", "",
           "| block | shape | impl | fwd ms | fwd+bwd ms | vs plain | TFLOP/s (fwd+bwd) | held MB | peak MB "
           "| rel err |", "| --- | --- | --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    first = {}
    for r in rows:
        base = first.setdefault((r.block, r.shape), r)
        mb = lambda v: "" if v is None else f"{v:.0f}"  # noqa: E731
        if r.block == "dequant":
            rate = f"{r.flop_fwd_bwd / r.fwd_ms / 1e6:.0f} GB/s"
        else:
            tf = r.flop_fwd_bwd / r.fwd_bwd_ms / 1e9
            rate = f"{tf:.0f} ({100 * tf / ceiling:.0f}% of mm)"
        out.append(f"| {r.block} | {r.shape} | {r.impl} | {r.fwd_ms:.3f} | {r.fwd_bwd_ms:.3f} "
                   f"| {base.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x | {rate} | {mb(r.held_mb)} | {mb(r.peak_mb)} "
                   f"| {r.rel_err:.1e} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="llama3-8b,gemma-7b")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dev = torch.device(args.device)
    assert dev.type != "cuda" or torch.cuda.is_available(), "bench/lora_kernels.py needs a CUDA GPU"
    torch.manual_seed(0)
    import bitsandbytes

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, bitsandbytes {bitsandbytes.__version__}")
    ceiling = matmul_ceiling(dev)
    rows: list[Row] = []
    for shape in args.shapes.split(","):
        bench_shape(shape, args.tokens, args.rank, dev, rows)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    table = render(rows, ceiling)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"matmul_TFLOPs": ceiling, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
