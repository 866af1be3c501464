"""Benchmark: export a Llama-3-8B-shaped run (random bf16 base + random PEFT LoRA adapter).

    python bench/export.py                 # 32 layers: ~16 GB base in bench/cache (made once)
    python bench/export.py --layers 4      # same widths and vocabulary, 4 layers (~3.2 GB)
    python bench/export.py --convert-script PATH/convert_hf_to_gguf.py   # also time llama.cpp's route
    python bench/export.py --quant q4_k_m --convert-script ...           # a k-quant mix, both routes

Each export runs in a fresh subprocess; wall time and that process's peak RSS (os.wait4) are
reported. Exports: merged bf16 safetensors (export.merge) and a GGUF of --quant (default q8_0;
export.to_gguf, directly from the merged tensors). With --convert-script, llama.cpp's own route
is timed too: the merged bf16 checkpoint converted with convert_hf_to_gguf.py --outtype q8_0, or
for a k-quant mix --outtype f16 and then llama-quantize's library call (llama_cpp.llama_model_quantize,
needs llama-cpp-python), as Unsloth's and Axolotl's GGUF export do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rms_norm_eps=1e-5)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    h, f, v = LLAMA3_8B["hidden_size"], LLAMA3_8B["intermediate_size"], LLAMA3_8B["vocab_size"]
    kv = h // LLAMA3_8B["num_attention_heads"] * LLAMA3_8B["num_key_value_heads"]
    out = {"model.embed_tokens.weight": (v, h)}
    for i in range(layers):
        p = f"model.layers.{i}."
        out.update({p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                    p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                    p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                    p + "mlp.down_proj.weight": (h, f), p + "input_layernorm.weight": (h,),
                    p + "post_attention_layernorm.weight": (h,)})
    out.update({"model.norm.weight": (h,), "lm_head.weight": (v, h)})
    return out


def make_base(path: Path, layers: int) -> None:
    """Random bf16 checkpoint, written shard by shard so generating it needs little memory."""
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(ROOT / "tests"))
    import testdata

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map, shard, size, n = {}, {}, 0, 0

    def flush():
        nonlocal shard, size, n
        n += 1
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard, size = {}, 0

    for name, shape in shapes(layers).items():
        if len(shape) == 1:
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        shard[name] = t
        size += t.nbytes
        if size > 2 * 10**9:
            flush()
    if shard:
        flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = dict(LLAMA3_8B, model_type="llama", architectures=["LlamaForCausalLM"], num_hidden_layers=layers,
                  head_dim=128, tie_word_embeddings=False, dtype="bfloat16", bos_token_id=128000,
                  eos_token_id=128001, rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                        "original_max_position_embeddings": 8192})
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.copyfile(testdata.fast_tokenizer_json("llama-bpe"), tmp / "tokenizer.json")
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "chat_template": testdata.template("meta-llama-Llama-3.1-8B-Instruct")}))
    tmp.rename(path)


def make_adapter(path: Path, base: Path, layers: int) -> None:
    """A PEFT-format LoRA adapter (r=16 on every projection), as the trainer saves it."""
    import torch
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for name, shape in shapes(layers).items():
        module = name.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            key = f"base_model.model.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn((RANK, shape[1]), generator=gen) * 0.01
            tensors[f"{key}.lora_B.weight"] = torch.randn((shape[0], RANK), generator=gen) * 0.01
    save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS), "bias": "none",
        "base_model_name_or_path": str(base), "use_rslora": False, "fan_in_fan_out": False}, indent=2))
    tmp.rename(path)


# The child reports its own high-water mark: ru_maxrss from wait4 would include this (parent)
# process's size, which Linux carries into the child's maxrss through fork + exec.
PEAK_RSS = ("\nimport atexit\n"
            "def _peak():\n"
            "    kb = next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]\n"
            "    open(PEAK_FILE, 'w').write(kb)\n"
            "atexit.register(_peak)\n")


def timed(code: str, argv: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS GB) of `code` run with `argv` in a fresh Python process."""
    peak_file = Path(f"/tmp/bench-export-peak-{os.getpid()}")
    script = f"PEAK_FILE = {str(peak_file)!r}" + PEAK_RSS + code
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", script, *argv], env=env)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed: {code} {' '.join(argv)}")
    peak_kb = int(peak_file.read_text())
    peak_file.unlink()
    return wall, peak_kb / 1024**2


# llama-quantize's library call; the ftype is the one export writes for the mix (gguf's LlamaFileType)
LLAMA_QUANTIZE = ("\nimport ctypes, sys, llama_cpp\nfrom export.kquants import MIXES\n"
                  "llama_cpp.llama_backend_init()\np = llama_cpp.llama_model_quantize_default_params()\n"
                  "p.ftype = int(MIXES[sys.argv[3]][1])\n"
                  "assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p)) == 0\n")


def size_gb(path: Path) -> float:
    files = [path] if path.is_file() else list(path.rglob("*"))
    return sum(f.stat().st_size for f in files if f.is_file()) / 1e9


def export_routes(adapter: Path, out: Path, q: str, convert_script: Path | None) -> list[tuple]:
    """(name, wall s, peak RSS GB, output GB) of our routes and, with convert_script, llama.cpp's."""
    sys.path.insert(0, str(ROOT))
    from export.kquants import MIXES

    merged, ours = out / "merged-bf16", out / f"model-{q}.gguf"
    rows = []
    call = "\nimport export, sys\nexport.{}(sys.argv[1], sys.argv[2], {}, force=True)\n"
    wall, rss = timed(call.format("merge", "dtype='bfloat16'"), [str(adapter), str(merged)])
    rows.append(("merge -> bf16 safetensors (export.merge)", wall, rss, size_gb(merged)))
    wall, rss = timed(call.format("to_gguf", repr(q)), [str(adapter), str(ours)])
    rows.append((f"{q} GGUF from run (export.to_gguf)", wall, rss, size_gb(ours)))
    if convert_script:
        env = dict(os.environ, PYTHONPATH=f"{convert_script.parent}:{convert_script.parent / 'gguf-py'}")
        mix = q in MIXES
        ref = out / f"llama-cpp-{'f16' if mix else q}.gguf"
        convert = "\nimport runpy, sys\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"
        cwall, crss = timed(convert, [str(convert_script), str(merged), "--outtype", "f16" if mix else q,
                                      "--outfile", str(ref)], env)
        rows.append((f"llama.cpp convert_hf_to_gguf.py bf16 dir -> {'f16' if mix else q}", cwall, crss,
                     size_gb(ref)))
        steps = [rows[0], rows[-1]]
        if mix:
            quantized = out / f"llama-cpp-{q}.gguf"
            qwall, qrss = timed(LLAMA_QUANTIZE, [str(ref), str(quantized), q])
            rows.append((f"llama-quantize (llama_model_quantize) f16 -> {q}", qwall, qrss, size_gb(quantized)))
            steps.append(rows[-1])
        rows.append(("  = llama.cpp route, end to end", sum(r[1] for r in steps), max(r[2] for r in steps), None))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--cache", type=Path, default=ROOT / "bench" / "cache")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    ap.add_argument("--convert-script", type=Path, help="llama.cpp's convert_hf_to_gguf.py (optional)")
    ap.add_argument("--quant", default="q8_0", help="GGUF type or k-quant mix (export.QUANTS)")
    args = ap.parse_args()
    base = args.cache / f"llama3-8b-shape-{args.layers}L"
    adapter = args.cache / f"llama3-8b-shape-{args.layers}L-lora-r{RANK}"
    if not base.exists():
        print(f"generating {base} ...", flush=True)
        make_base(base, args.layers)
    if not adapter.exists():
        make_adapter(adapter, base, args.layers)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = export_routes(adapter, args.out, args.quant, args.convert_script)
    print(f"\nLlama-3-8B widths, {args.layers} layers, base {size_gb(base):.1f} GB bf16, LoRA r={RANK} on all "
          f"projections; {os.cpu_count()} CPUs\n")
    print(f"{'export':<52}{'wall s':>10}{'peak RSS GB':>14}{'output GB':>12}")
    for name, wall, rss, size in rows:
        print(f"{name:<52}{wall:>10.1f}{rss:>14.2f}{'' if size is None else f'{size:.2f}':>12}")


if __name__ == "__main__":
    main()
