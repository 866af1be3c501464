"""Per-kernel micro-benchmarks: each Triton kernel against the plain PyTorch function it replaces
(trainer.models.ops) and against torch.compile of that function, forward and forward+backward, at the
Llama-3-8B, Mistral-7B and Gemma-7B sizes.

    python bench/kernels.py [--shapes llama3-8b,mistral-7b,gemma-7b] [--tokens 4096] [--no-compile]
                            [--json results.json]

Needs a CUDA GPU. `plain` is the trainer.models.ops function on its plain path (its default, kernel=False),
`triton` calls trainer.kernels directly. Prints the measured ceilings (device-to-device copy, bf16 matmul), then one row per
(kernel, shape, implementation): median times, the fewest bytes the op must move (each input read
once, each output written once) and the bandwidth that implies, or for the fused cross-entropy the
matmul FLOP rate and the peak memory above the inputs. Timings are medians of triton.testing.do_bench
(CUDA events), inputs rotated among several sets when one set would fit in L2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from queued_timing import queued_call_ms  # noqa: E402

from trainer import kernels  # noqa: E402
from trainer.models import ops  # noqa: E402

SHAPES = {
    "llama3-8b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, vocab=128256, act="silu",
                      offset=0.0, theta=500000.0),
    "mistral-7b": dict(hidden=4096, inter=14336, heads=32, kv=8, head_dim=128, vocab=32000, act="silu",
                       offset=0.0, theta=10000.0),
    "gemma-7b": dict(hidden=3072, inter=24576, heads=16, kv=16, head_dim=256, vocab=256000, act="gelu_tanh",
                     offset=1.0, theta=10000.0),
}
KERNELS = ("rms_norm", "add_rms_norm", "act", "rope", "ce")
DTYPE = torch.bfloat16
L2_BYTES = 64 * 2**20  # rotate input sets when one set is smaller than a few times this


@dataclass
class Row:
    kernel: str
    shape: str
    impl: str
    fwd_ms: float
    fwd_bwd_ms: float
    eager_fwd_bwd_ms: float  # launched one op at a time from Python, launch overhead included
    queued: bool  # fwd_ms and fwd_bwd_ms are GPU time alone (calls queued behind a sleep kernel)
    bytes_fwd_bwd: int | None = None  # memory-bound ops: the fewest bytes fwd+bwd must move
    flop_fwd_bwd: float | None = None  # the fused cross-entropy: matmul FLOPs of fwd+bwd
    peak_mb: float | None = None  # peak allocated during fwd+bwd above the inputs
    rel_err: float = 0.0  # ||out - plain|| / ||plain|| of the first forward output


def _median_ms(fn: Callable[[], object]) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def _queued_median_ms(fn: Callable[[], object], eager_ms: float, iters: int = 40) -> float:
    """GPU time alone of `iters` calls queued back to back (see queued_timing), median of 5."""
    return queued_call_ms(fn, torch.device("cuda"), iters, eager_ms)[0]


def ceilings() -> dict[str, float]:
    """Measured copy bandwidth (GB/s, read + write) and bf16 matmul rate (TFLOP/s) on random data."""
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = _median_ms(lambda: dst.copy_(src))
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    mm_ms = _median_ms(lambda: a @ b)
    return {"copy_GBps": 2 * 2**30 / copy_ms / 1e6, "bf16_mm_TFLOPs": 2 * 8192**3 / mm_ms / 1e9}


@dataclass
class InPlace:
    """An in-place op timed as its two launches, without autograd: forward(*inputs) overwrites the inputs,
    backward(*grads) the gradients. (Autograd refuses in-place on the leaves a benchmark reuses, and a
    fresh non-leaf per call would add a copy to the time measured.)"""

    forward: Callable
    backward: Callable


def _timed(call: Callable | InPlace, sets: list[list[torch.Tensor]],
           queued: bool) -> tuple[float, float, float, float, torch.Tensor]:
    """Median fwd and fwd+bwd ms (GPU time alone when queued), eager fwd+bwd ms, peak MB of one fwd+bwd
    above the inputs, and the first forward output."""
    if isinstance(call, InPlace):
        sets = [[t.detach() for t in inputs] for inputs in sets]
        first = [t.clone() for t in sets[0]]
        outs0 = call.forward(*first)
        assert outs0[0].data_ptr() == first[0].data_ptr(), "the in-place op wrote a new tensor"
    else:
        outs0 = call(*sets[0])
    outs0 = outs0 if isinstance(outs0, tuple) else (outs0,)
    grads = [torch.randn_like(o) if o.dim() else torch.ones_like(o) for o in outs0]
    fwd_cycle, bwd_cycle = itertools.cycle(sets), itertools.cycle(sets)

    def fwd() -> None:
        with torch.no_grad():
            if isinstance(call, InPlace):
                call.forward(*next(fwd_cycle))
            else:
                call(*next(fwd_cycle))

    def fwd_bwd() -> None:
        inputs = next(bwd_cycle)
        if isinstance(call, InPlace):
            call.forward(*inputs)
            call.backward(*grads)
            return
        outs = call(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, [t for t in inputs if t.requires_grad], grads)

    eager_ms = _median_ms(fwd_bwd)
    if queued:
        fwd_ms, fwd_bwd_ms = _queued_median_ms(fwd, eager_ms), _queued_median_ms(fwd_bwd, eager_ms)
    else:
        fwd_ms, fwd_bwd_ms = _median_ms(fwd), eager_ms
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    return fwd_ms, fwd_bwd_ms, eager_ms, peak_mb, outs0[0].detach()


def _run(kernel: str, shape: str, impls: dict[str, Callable], make_inputs: Callable[[], list[torch.Tensor]],
         set_bytes: int, rows: list[Row], queued: bool, **metric) -> None:
    # Same input sets for every implementation; several when one set would stay in L2 between calls.
    sets = [make_inputs() for _ in range(max(1, min(4, (3 * L2_BYTES) // set_bytes + 1)))]
    plain_out = None
    for impl, call in impls.items():
        fwd_ms, fwd_bwd_ms, eager_ms, peak_mb, out = _timed(call, sets, queued)
        if impl == "plain":
            plain_out = out.float()
        err = ((out.float() - plain_out).norm() / plain_out.norm()).item()
        measure = {k: v[impl] if isinstance(v, dict) else v for k, v in metric.items()}
        rows.append(Row(kernel, shape, impl, fwd_ms, fwd_bwd_ms, eager_ms, queued, peak_mb=peak_mb, rel_err=err,
                        **measure))
        print(f"  {kernel:10s} {shape:11s} {impl:8s} fwd {fwd_ms:8.3f} ms  fwd+bwd {fwd_bwd_ms:8.3f} ms  "
              f"(eager fwd+bwd {eager_ms:8.3f} ms)", flush=True)
    del sets
    torch.cuda.empty_cache()


def _impls(plain: Callable, triton_fn: Callable, compile_too: bool,
           **more: Callable | InPlace) -> dict[str, Callable | InPlace]:
    impls = {"plain": plain}
    if compile_too:
        impls["compile"] = torch.compile(plain, dynamic=False)
    impls["triton"] = triton_fn
    impls.update(more)
    return impls


def bench_shape(name: str, tokens: int, compile_too: bool, rows: list[Row], only: set[str]) -> None:
    s = SHAPES[name]
    dev, b = "cuda", 2  # batch 2 x (tokens / 2): the training benchmark's 2 x 2048
    t = tokens // b
    esize = torch.finfo(DTYPE).bits // 8

    # RMSNorm over [B, T, hidden]: fwd reads x, writes y; bwd reads dy, x, writes dx (+ rstd, w, dw).
    d = s["hidden"]

    def norm_inputs() -> list[torch.Tensor]:
        x = torch.randn(b, t, d, device=dev, dtype=DTYPE, requires_grad=True)
        w = (torch.randn(d, device=dev) * 0.1 + (0.0 if s["offset"] else 1.0)).to(DTYPE).requires_grad_()
        return [x, w]

    off = s["offset"]
    if "rms_norm" in only:
        _run("rms_norm", name, _impls(lambda x, w: ops.rms_norm(x, w, 1e-6, off),
                                      lambda x, w: kernels.rms_norm(x, w, 1e-6, off), compile_too),
             norm_inputs, 2 * tokens * d * esize, rows, True, bytes_fwd_bwd=5 * tokens * d * esize + tokens * 4 * 2)

    # Residual add + RMSNorm: fwd reads x, r, writes s, y; bwd reads dy, ds, s, writes one gradient for both
    # x and r (+ rstd, w, dw). `unfused` is the add in PyTorch followed by the RMSNorm kernel: the
    # decoder on CUDA before the fused kernel.
    def add_norm_inputs() -> list[torch.Tensor]:
        return [torch.randn(b, t, d, device=dev, dtype=DTYPE, requires_grad=True)] + norm_inputs()

    # Outputs (y, s): the first is the one `rel err` compares, and s equals plain's bit for bit.
    def add_norm_plain(x, r, w):
        s_, y = ops.add_rms_norm(x, r, w, 1e-6, off)
        return y, s_

    def add_norm_fused(x, r, w):
        s_, y = kernels.add_rms_norm(x, r, w, 1e-6, off)
        return y, s_

    def add_then_norm_kernel(x, r, w):
        s_ = x + r
        return kernels.rms_norm(s_, w, 1e-6, off), s_

    if "add_rms_norm" in only:
        _run("add_rms_norm", name,
             _impls(add_norm_plain, add_norm_fused, compile_too, unfused=add_then_norm_kernel), add_norm_inputs,
             3 * tokens * d * esize, rows, True, bytes_fwd_bwd=8 * tokens * d * esize + tokens * 4 * 2)

    # Gated activation over [B, T, intermediate]: fwd reads gate, up, writes out; bwd reads dout, gate, up,
    # writes dgate, dup.
    inter, act = s["inter"], s["act"]

    def act_inputs() -> list[torch.Tensor]:
        return [torch.randn(b, t, inter, device=dev, dtype=DTYPE, requires_grad=True) for _ in range(2)]

    if "act" in only:
        _run(f"{act}", name, _impls(lambda g, u: ops.gated_activation(g, u, act),
                                    lambda g, u: kernels.gated_activation(g, u, act), compile_too),
             act_inputs, 2 * tokens * inter * esize, rows, True, bytes_fwd_bwd=8 * tokens * inter * esize)

    # RoPE on the projection outputs q [B, T, H * D] and k [B, T, KV * D]. The leaves given here make
    # `triton` rotate out of place; `in-place` times the decoder's in-place launches (its backward launch
    # is the forward kernel with -sin: the rotation by -theta, the same work when the table's halves are
    # equal, as rope_tables makes them).
    h, kv, hd = s["heads"], s["kv"], s["head_dim"]
    inv_freq = 1.0 / s["theta"] ** (torch.arange(0, hd, 2, device=dev, dtype=torch.float32) / hd)
    cos, sin = ops.rope_tables(torch.arange(t, device=dev).expand(b, t), inv_freq)
    neg_sin = -sin

    def rope_inputs() -> list[torch.Tensor]:
        q = torch.randn(b, t, h * hd, device=dev, dtype=DTYPE, requires_grad=True)
        k = torch.randn(b, t, kv * hd, device=dev, dtype=DTYPE, requires_grad=True)
        return [q, k]

    in_place = InPlace(lambda q, k: kernels.apply_rope(q, k, cos, sin, hd),
                       lambda dq, dk: kernels.apply_rope(dq, dk, cos, neg_sin, hd))
    qk_bytes = tokens * (h + kv) * hd * esize
    if "rope" in only:
        _run("rope", name, _impls(lambda q, k: ops.apply_rope(q, k, cos, sin, hd),
                                  lambda q, k: kernels.apply_rope(q, k, cos, sin, hd), compile_too,
                                  **{"in-place": in_place}),
             rope_inputs, qk_bytes, rows, True, bytes_fwd_bwd=4 * qk_bytes + 2 * 2 * tokens * hd * 4)

    # Fused linear cross-entropy, lm_head frozen (QLoRA): logits, dh = dlogits @ W: 2 products of 2NVH.
    vocab = s["vocab"]
    softcaps = [None, 30.0] if name == "gemma-7b" else [None]
    for softcap in softcaps if "ce" in only else []:
        for train_head in ([False, True] if name == "llama3-8b" else [False]):
            def ce_inputs(train_head: bool = train_head) -> list[torch.Tensor]:
                hid = torch.randn(b, t, d, device=dev, dtype=DTYPE, requires_grad=True)
                w = (torch.randn(vocab, d, device=dev) * 8 / d**0.5).to(DTYPE).requires_grad_(train_head)
                labels = torch.randint(0, vocab, (b, t), device=dev)
                labels[:, : t // 4] = ops.IGNORE_INDEX  # a prompt quarter masked, as in SFT
                return [hid, w, ops.shift_targets(labels)]

            def plain(hid, w, tg, softcap=softcap):
                return ops.causal_lm_loss(hid @ w.t(), tg, softcap=softcap)

            def fused(hid, w, tg, softcap=softcap):
                return kernels.fused_linear_cross_entropy(hid, w, tg, softcap=softcap)

            label = "ce" + ("+cap30" if softcap else "") + ("+dW" if train_head else "")
            # Matmul FLOPs actually done: the plain path multiplies every token, the fused path skips the
            # ignored quarter (b * (t // 4 + 1) targets: the masked quarter plus each row's last position).
            products = 3 if train_head else 2
            counted = tokens - b * (t // 4 + 1)
            flop = {impl: 2 * (counted if impl == "triton" else tokens) * vocab * d * products
                    for impl in ("plain", "compile", "triton")}
            _run(label, name, _impls(plain, fused, compile_too), ce_inputs, 10**12, rows, False,
                 flop_fwd_bwd=flop)


def render(rows: list[Row], ceil: dict[str, float]) -> str:
    out = [f"ceilings: copy {ceil['copy_GBps']:.0f} GB/s (read+write), bf16 matmul {ceil['bf16_mm_TFLOPs']:.0f} TFLOP/s",
           "fwd/fwd+bwd: GPU time alone for the memory-bound ops (*: 40 calls queued behind a sleep kernel, no",
           "launch gaps), event-timed eager runs for the cross-entropy (it syncs once per call); eager: one",
           "fwd+bwd at a time from Python, launch overhead included.",
           "", "| kernel | shape | impl | fwd ms | fwd+bwd ms | vs plain | vs compile | achieved (fwd+bwd) "
           "| eager fwd+bwd ms | peak MB | rel err |",
           "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    plain = {(r.kernel, r.shape): r for r in rows if r.impl == "plain"}
    compiled = {(r.kernel, r.shape): r for r in rows if r.impl == "compile"}
    for r in rows:
        speedup = plain[(r.kernel, r.shape)].fwd_bwd_ms / r.fwd_bwd_ms
        c = compiled.get((r.kernel, r.shape))
        vs_compile = f"{c.fwd_bwd_ms / r.fwd_bwd_ms:.2f}x" if c else "-"
        if r.bytes_fwd_bwd:
            gbps = r.bytes_fwd_bwd / r.fwd_bwd_ms / 1e6
            achieved = f"{gbps:.0f} GB/s ({100 * gbps / ceil['copy_GBps']:.0f}% of copy)"
        else:
            tf = r.flop_fwd_bwd / r.fwd_bwd_ms / 1e9
            achieved = f"{tf:.0f} TFLOP/s ({100 * tf / ceil['bf16_mm_TFLOPs']:.0f}% of mm)"
        err = f"{r.rel_err:.1e}"
        star = "*" if r.queued else ""
        out.append(f"| {r.kernel}{star} | {r.shape} | {r.impl} | {r.fwd_ms:.3f} | {r.fwd_bwd_ms:.3f} | {speedup:.2f}x "
                   f"| {vs_compile} | {achieved} | {r.eager_fwd_bwd_ms:.3f} | {r.peak_mb:.0f} | {err} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--only", default=",".join(KERNELS), help="comma-separated subset of " + ", ".join(KERNELS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    unknown = set(args.only.split(",")) - set(KERNELS)
    if unknown:
        parser.error(f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(KERNELS)})")
    assert torch.cuda.is_available(), "bench/kernels.py needs a CUDA GPU"
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    ceil = ceilings()
    rows: list[Row] = []
    for name in args.shapes.split(","):
        bench_shape(name, args.tokens, not args.no_compile, rows, set(args.only.split(",")))
    table = render(rows, ceil)
    print(table)
    if args.json:
        args.json.write_text(json.dumps({"ceilings": ceil, "rows": [asdict(r) for r in rows]}, indent=1))


if __name__ == "__main__":
    main()
