"""Benchmark: our k-quant GGUFs against llama.cpp's own quantizer on a random Llama with a real vocabulary.

    OMP_NUM_THREADS=1 python bench/kquant_quality.py                  # every mix, hidden 1024, 8 layers
    OMP_NUM_THREADS=1 python bench/kquant_quality.py --mixes q4_k_m   # one mix (time it first)

A random Llama around the official Llama 3.1 tokenizer files (128,256 rows; tests/testdata.real_tokenizer)
whose next token is decided (tests/export/export_helpers.confident_weights as in the k-quant test's tiny
model, with --head 0.2 instead of its 0.02: over 128,256 rows that leaves a clear winner, 1 nat ahead of the
2nd, at 92% of positions in f16 against 0.3%), exported to f16 with export.to_gguf. Per mix: our file
(export.to_gguf(base, ..., mix), one torch thread unless OMP_NUM_THREADS says otherwise) and llama.cpp's
(llama_model_quantize on our f16 file, 2 threads); mean KL of each file's next-token distributions against the f16 file's and top-1 agreement, in
llama.cpp, over the first --tokens tokens of README.md; file sizes; wall time of each quantization.
GGUFs are opened only through export.verify.LlamaCppFile (use_extra_bufts off: AMX segfaults otherwise).
Raw results: bench/results/kquant-quality-<name>-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# bench/ itself off the path: bench/kernels.py would shadow the `kernels` package transformers imports
sys.path = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "export")] + [
    p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import builders  # noqa: E402
import testdata  # noqa: E402
import torch  # noqa: E402
from export_helpers import LlamaCppModel, confident_weights, kl_and_top1, llama_cpp_quantize, log_probs  # noqa: E402

import export  # noqa: E402
from export import kquants  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixes", default=",".join(kquants.MIXES), help="comma-separated k-quant mixes")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--init", type=float, default=None, help="initializer_range (default: HF's, 0.02)")
    ap.add_argument("--head", type=float, default=0.2,
                    help="confident_weights' head factor (the tiny test's 0.02 leaves a 128K vocabulary undecided)")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--name", default=None, help="results file name part (default llama3_1-h<hidden>-<layers>L)")
    ap.add_argument("--workdir", default=None, help="where the model and GGUFs go (default: a temp dir)")
    args = ap.parse_args()
    mixes = [m for m in args.mixes.split(",") if m]
    unknown = [m for m in mixes if m not in kquants.MIXES]
    if unknown:
        sys.exit(f"unknown mixes {unknown}; valid: {', '.join(kquants.MIXES)}")
    name = args.name or f"llama3_1-h{args.hidden}-{args.layers}L"
    shape = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                 num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, max_position_embeddings=2048)
    if args.init is not None:
        shape["initializer_range"] = args.init

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base = builders.real_checkpoint(root / "base", testdata.real_tokenizer("llama3_1"), "llama3_1", **shape)
        confident_weights(base, head=args.head)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", export.TokenizationWarning)
            t1 = time.perf_counter()
            f16 = export.to_gguf(base, root / "f16.gguf", "f16")
            f16_s = time.perf_counter() - t1
        f16_bytes = f16.stat().st_size
        text = (ROOT / "README.md").read_text(encoding="utf-8")
        with LlamaCppModel(f16, n_ctx=args.tokens) as m:
            ids = m.tokenize(text)[:args.tokens]
        assert len(ids) == args.tokens, len(ids)
        ref = log_probs(f16, ids)
        top2 = ref.topk(2, -1).values
        decided = float((top2[:, 0] - top2[:, 1] > 1).double().mean())  # a clear winner: 1 nat ahead
        print(f"model: Llama 3.1 vocabulary (128,256), {shape}; f16 GGUF {f16_bytes:,} bytes "
              f"({f16_s:.1f} s); setup {time.perf_counter() - t0:.1f} s; {len(ids)} tokens of README.md; "
              f"f16 top-1 ahead of the 2nd by > 1 nat at {decided:.1%} of positions; torch threads {torch.get_num_threads()}",
              flush=True)

        rows = []
        for mix in mixes:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", export.TokenizationWarning)
                t = time.perf_counter()
                ours = export.to_gguf(base, root / f"ours-{mix}.gguf", mix)
                ours_s = time.perf_counter() - t
            t = time.perf_counter()
            theirs = llama_cpp_quantize(f16, root / f"theirs-{mix}.gguf", kquants.MIXES[mix][1])
            theirs_s = time.perf_counter() - t
            our_kl, our_top1 = kl_and_top1(ref, log_probs(ours, ids))
            their_kl, their_top1 = kl_and_top1(ref, log_probs(theirs, ids))
            row = dict(mix=mix, kl_ours=our_kl, kl_llama_cpp=their_kl, top1_ours=our_top1,
                       top1_llama_cpp=their_top1, bytes_ours=ours.stat().st_size, bytes_llama_cpp=theirs.stat().st_size,
                       quantize_s_ours=ours_s, quantize_s_llama_cpp=theirs_s)
            row["kl_ratio"] = our_kl / their_kl
            row["within_10pct"] = our_kl <= 1.1 * their_kl and our_top1 >= 0.9 * their_top1
            row["size_diff_pct"] = 100 * (row["bytes_ours"] - row["bytes_llama_cpp"]) / row["bytes_llama_cpp"]
            rows.append(row)
            print(f"{mix}: KL {our_kl:.6f} / {their_kl:.6f} (x{row['kl_ratio']:.3f}); top-1 {our_top1:.1%} / "
                  f"{their_top1:.1%}; bytes {row['bytes_ours']:,} / {row['bytes_llama_cpp']:,}; "
                  f"quantize {ours_s:.1f} s / {theirs_s:.1f} s", flush=True)
            ours.unlink()
            theirs.unlink()

    print("\n| mix | mean KL vs f16: ours | llama.cpp's | top-1 agreement: ours | llama.cpp's "
          "| file bytes: ours | llama.cpp's | quantize s: ours (1 thread) | llama.cpp's (2 threads) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mix']} | {r['kl_ours']:.6f} | {r['kl_llama_cpp']:.6f} | {r['top1_ours']:.1%} | "
              f"{r['top1_llama_cpp']:.1%} | {r['bytes_ours']:,} | {r['bytes_llama_cpp']:,} | "
              f"{r['quantize_s_ours']:.1f} | {r['quantize_s_llama_cpp']:.1f} |")

    out = ROOT / "bench" / "results" / f"kquant-quality-{name}-cpu.json"
    out.write_text(json.dumps(dict(
        model=dict(vocabulary="llama3_1", vocab_size=128256, **shape, weights=f"random, confident_weights(head={args.head})"),
        f16_bytes=f16_bytes, tokens=len(ids), text="README.md",
        f16_decided_fraction=decided, torch_threads=torch.get_num_threads(),
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), llama_cpp_quantize_threads=2,
        machine=dict(cpus=os.cpu_count(), processor=platform.processor() or platform.machine(), gpu=False),
        rows=rows), indent=2) + "\n", encoding="utf-8")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
