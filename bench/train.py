"""Benchmark (GPU): QLoRA training of a random-weight model, our trainer against the Hugging Face stack.

One process per variant (bench/train_variants.py), the same random weights (Llama-3-8B, Mistral-7B,
Gemma-7B, Qwen3-8B or Gemma-3-12B shape, written once from a config: no downloads), the same LoRA initialization and the same
random token batches: micro-batch 2 x 2048 tokens, grad-accum 4, LoRA r=32 alpha=32 on q,k,v,o,gate,up,
down, NF4 base (double quantization), bf16 autocast, paged 8-bit AdamW. Variants: ours with Triton
kernels, ours in plain PyTorch (ModelOptions kernels="off", `--kernels off`), both with the --gc gradient checkpointing mode; the
Hugging Face stack (transformers 4-bit + PEFT + SDPA + gradient checkpointing, as its docs show) and the
same with Liger-Kernel applied (apply_liger_kernel_to_<family>() before the model is built); Unsloth
(FastLanguageModel in 4-bit, its get_peft_model and "unsloth" gradient checkpointing, the HF variant's
step), which needs carried wheels on the GPU machine: bench/README.md, "Running the Unsloth comparison".

Per variant: tokens/s after warm-up, model-FLOPs utilization, memory after load, peak allocated and
reserved, per-step losses; with --max-seq the longest sequence that trains at batch 1 (one step per
length, upward until out of memory, then one probe halfway back; --time-budget seconds per variant).
After the table, each variant's largest relative loss difference from 'ours, plain PyTorch' and from
the HF stack over all steps (run --steps 20 for the 20-step loss check: within 0.5% of plain PyTorch,
1% of HF).

MFU = tokens/s x FLOPs per token / (--peak-tflops x GPUs). FLOPs per token, with P the frozen linear
parameters of the decoder layers (q,k,v,o,gate,up,down), V x H the lm_head, L layers, S the sequence
length and D = heads x head_dim the attention width:
    6 P          forward + recompute (gradient checkpointing) + input-gradient backward, 2 P each
  + 4 V H        lm_head forward + input-gradient backward (it sits outside the checkpointed layers)
  + 8 L S D      causal attention: QK^T and PV cost 2 S D per token together (half of 4 S D), counted
                 for the forward, the recompute and twice for the backward
LoRA's own FLOPs (about 1% at r=32) and the embedding lookup are not counted.

    python bench/train.py [--shape llama3-8b|mistral-7b|gemma-7b|qwen3-8b|gemma3-12b|tiny...] [--steps 6]
                          [--only ours,Liger,Unsloth]
                          [--gc on|offload|off] [--max-seq [--max-seq-limit N | --max-seq-lengths A,B,..]
                                                [--time-budget S]]
                          [--peak-tflops 785] [--json out.json] [--markdown]
    python bench/train.py --report a.json b.json [--markdown] [--json merged.json]   (tables of earlier runs)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_variants  # noqa: E402

SHAPES = {
    "llama3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0, max_position_embeddings=8192),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rope_theta=1e6,
                       max_position_embeddings=32768, sliding_window=None),
    "gemma-7b": dict(model_type="gemma", vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                     num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                     rope_theta=10000.0, max_position_embeddings=8192),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rope_theta=1e6, max_position_embeddings=40960, max_window_layers=36),
    # the text model of Gemma 3 12B: 5 sliding-window (1024) layers to 1 global, global RoPE scaled 8x
    "gemma3-12b": dict(model_type="gemma3_text", vocab_size=262208, hidden_size=3840, intermediate_size=15360,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                       sliding_window=1024, sliding_window_pattern=6, max_position_embeddings=131072),
    # small versions of each family, for a quick check of the whole path
    "tiny": dict(model_type="llama", vocab_size=32000, hidden_size=256, intermediate_size=688,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                 max_position_embeddings=8192),
    "tiny-mistral": dict(model_type="mistral", vocab_size=32768, hidden_size=256, intermediate_size=688,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                         max_position_embeddings=32768, sliding_window=None),
    "tiny-gemma": dict(model_type="gemma", vocab_size=32000, hidden_size=192, intermediate_size=512,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=128,
                       rope_theta=10000.0, max_position_embeddings=8192),
    "tiny-qwen3": dict(model_type="qwen3", vocab_size=32000, hidden_size=256, intermediate_size=688,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                       rope_theta=1e6, max_position_embeddings=40960, max_window_layers=2),
    "tiny-gemma3": dict(model_type="gemma3_text", vocab_size=32000, hidden_size=192, intermediate_size=512,
                        num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=128,
                        rope_theta=1e6, rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                        sliding_window=64, sliding_window_pattern=3, max_position_embeddings=131072),
}
FAMILIES = {
    "llama": dict(architectures=["LlamaForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "mistral": dict(architectures=["MistralForCausalLM"], hidden_act="silu", rms_norm_eps=1e-5,
                    tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    # Gemma's RMSNorm multiplies by (1 + w), so its neutral norm weight is 0; the head is the embedding
    "gemma": dict(architectures=["GemmaForCausalLM"], hidden_act="gelu_pytorch_tanh",
                  hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
                  bos_token_id=2, eos_token_id=1),
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], hidden_act="silu", rms_norm_eps=1e-6,
                  tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, sliding_window=None,
                  bos_token_id=151643, eos_token_id=151645),
    # Gemma 3 also norms each head of q and k, and around the MLP (pre/post_feedforward_layernorm)
    "gemma3_text": dict(architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
                        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256,
                        final_logit_softcapping=None, attn_logit_softcapping=None, bos_token_id=2, eos_token_id=1),
}
QK_NORM = ("qwen3", "gemma3_text")  # q_norm and k_norm over each head
SANDWICH_NORMS = ("gemma3_text",)  # pre_ and post_feedforward_layernorm
NORM_OFFSET = ("gemma", "gemma3_text")  # the norm multiplies by (1 + w): neutral weight 0
REFERENCES = ("ours, plain PyTorch", "HF transformers+PEFT")


def model_config(shape: str) -> dict:
    """config.json of the random model of `shape` (read by transformers' class and by our loader)."""
    s = SHAPES[shape]
    return {**FAMILIES[s["model_type"]], **s, "torch_dtype": "bfloat16"}


def generate(shape: str, out: Path) -> Path:
    """Random bf16 checkpoint of `shape` (made on the GPU when there is one; written shard by shard)."""
    from safetensors.torch import save_file

    cfg = model_config(shape)
    done = out / ".complete"
    if done.exists() and json.loads((out / "config.json").read_text()) == cfg:
        return out
    done.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    norm = 0.0 if cfg["model_type"] in NORM_OFFSET else 1.0
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.empty(s, dtype=torch.bfloat16, device=dev).normal_(0, 0.02, generator=gen).cpu()

    def norm_weight(n: int) -> torch.Tensor:
        return torch.full((n,), norm, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    shard = {"model.embed_tokens.weight": rnd(v, h), "model.norm.weight": norm_weight(h)}
    if not cfg["tie_word_embeddings"]:
        shard["lm_head.weight"] = rnd(v, h)
    save_file(shard, out / "model-embed.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, "model-embed.safetensors"))
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shard = {p + "input_layernorm.weight": norm_weight(h),
                 p + "post_attention_layernorm.weight": norm_weight(h),
                 p + "self_attn.q_proj.weight": rnd(q, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                 p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, q),
                 p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                 p + "mlp.down_proj.weight": rnd(h, i)}
        if cfg["model_type"] in QK_NORM:
            shard |= {p + "self_attn.q_norm.weight": norm_weight(hd), p + "self_attn.k_norm.weight": norm_weight(hd)}
        if cfg["model_type"] in SANDWICH_NORMS:
            shard |= {p + "pre_feedforward_layernorm.weight": norm_weight(h),
                      p + "post_feedforward_layernorm.weight": norm_weight(h)}
        name = f"model-layer{n:03d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    done.touch()
    return out


def flops_per_token(cfg: dict, seq: int) -> float:
    """Model FLOPs per trained token at sequence length `seq` (the formula in the module docstring)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    layers = cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = hd * cfg["num_attention_heads"], hd * cfg["num_key_value_heads"]
    frozen = layers * (2 * h * q + 2 * h * kv + 3 * h * i)  # q and o, k and v, gate up and down
    return 6 * frozen + 4 * v * h + 8 * layers * seq * q


def mfu(tokens_per_s: float, cfg: dict, seq: int, peak_tflops: float, gpus: int = 1) -> float:
    """Model-FLOPs utilization: achieved FLOP/s over `gpus` x `peak_tflops`."""
    return tokens_per_s * flops_per_token(cfg, seq) / (peak_tflops * 1e12 * gpus)


def add_mfu(results: dict, cfg: dict, seq: int, peak_tflops: float) -> None:
    """Put an 'mfu' on each result with a throughput and on the longest batch-1 step of a --max-seq search."""
    for r in results.values():
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], cfg, seq, peak_tflops, r.get("world_size", 1))
        best = r.get("max_seq") or {}
        if best.get("step_s"):
            best["mfu"] = mfu(best["longest"] / best["step_s"], cfg, best["longest"], peak_tflops)


def loss_agreement(results: dict) -> dict[str, dict[str, float]]:
    """{variant: {reference: largest |loss - reference loss| / reference loss over the common steps}}."""
    out: dict[str, dict[str, float]] = {}
    for name, r in results.items():
        for ref in REFERENCES:
            a, b = r.get("losses"), results.get(ref, {}).get("losses")
            mirrored = name in REFERENCES and REFERENCES.index(ref) < REFERENCES.index(name)
            same_data = r.get("batches") == results[ref].get("batches") if ref in results else False
            if name != ref and a and b and same_data and not mirrored:
                out.setdefault(name, {})[ref] = max(abs(x - y) / abs(y) for x, y in zip(a, b))
    return out


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} GB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _longest(r: dict) -> str:
    m = r.get("max_seq")
    if not m:
        return "-"
    more = "+" if m["limit_reached"] or m["stopped"] else ""
    return f"{m['longest']:,}{more} ({_gb(m['peak_allocated_gib'])})" if m["longest"] else "none"


def print_table(meta: dict, results: dict) -> None:
    """The console table, then the --max-seq details and the loss agreement when there are any."""
    w = max(25, *(len(n) + 2 for n in results))
    print(f"\n{meta['title']}")
    print(f"{'variant':<{w}}{'tokens/s':>9}{'MFU':>7}{'after load':>12}{'peak alloc':>12}"
          f"{'peak reserved':>15}{'longest at batch 1':>24}  first losses")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<{w}}error: {r['error']}")
            continue
        tps = f"{r['tokens_per_s']:>9.0f}" if "tokens_per_s" in r else f"{'-':>9}"
        tps += f"{_pct(r.get('mfu')):>7}"
        print(f"{name:<{w}}{tps}{_gb(r['mem_after_load_gib']):>12}{_gb(r.get('peak_allocated_gib')):>12}"
              f"{_gb(r.get('peak_reserved_gib')):>15}{_longest(r):>24}  {r.get('losses', [])[:3]}")
    searched = {n: r["max_seq"] for n, r in results.items() if "max_seq" in r}
    if searched:
        print("\nbatch 1, one step per length: peak allocated (step time); '+': limit or time budget reached")
        lengths = sorted({p["seq"] for m in searched.values() for p in m["probes"]})
        widths = [max(26, len(n) + 2) for n in searched]
        print(f"{'length':>8}" + "".join(f"{n:>{cw}}" for n, cw in zip(searched, widths)))
        for n_tok in lengths:
            cells = []
            for m, cw in zip(searched.values(), widths):
                p = next((p for p in m["probes"] if p["seq"] == n_tok), None)
                cell = "" if p is None else (f"{p['peak_allocated_gib']:.2f} GB ({p['step_s']:.1f} s)"
                                              if p["fits"] else "out of memory")
                cells.append(f"{cell:>{cw}}")
            print(f"{n_tok:>8}" + "".join(cells))
        for n, m in searched.items():
            best = f", MFU {m['mfu']:.1%} at the longest" if "mfu" in m else ""
            reach = f"; peaks extrapolated linearly reach the card's memory at ~{m['linear_reach']:,}" \
                if m.get("linear_reach") else ""
            print(f"{n}: longest {m['longest']:,} in {m['search_s']:.0f} s{best}{reach}"
                  + (f"; stopped: {m['stopped']}" if m["stopped"] else ""))
    agreement = loss_agreement(results)
    if agreement:
        steps = min(len(r["losses"]) for r in results.values() if r.get("losses"))
        print(f"\nlargest relative loss difference over {steps} steps "
              "(targets: within 0.5% of plain PyTorch, 1% of HF)")
        for name, refs in agreement.items():
            print(f"{name:<{w}}" + "   ".join(f"vs {ref}: {d:.3%}" for ref, d in refs.items()))


def markdown(meta: dict, results: dict) -> str:
    """A README-ready table of `results`."""
    lines = [f"{meta['title']}", "",
             "| variant | tokens/s | MFU | after load | peak allocated | peak reserved "
             "| longest at batch 1 |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} | | | | | |")
            continue
        tps = f"{r['tokens_per_s']:,.0f} | {_pct(r.get('mfu'))}" if "tokens_per_s" in r else "- | -"
        mem = " | ".join(_gb(x) for x in (r["mem_after_load_gib"], r.get("peak_allocated_gib"),
                                             r.get("peak_reserved_gib")))
        lines.append(f"| {name} | {tps} | {mem} | {_longest(r)} |")
    return "\n".join(lines)


def _selected(only: str | None) -> list[str]:
    names = list(train_variants.VARIANTS)
    if not only:
        return names
    only = only.strip().lower()
    exact = [n for n in names if n.lower() == only]  # "ours, Triton kernels" alone, not its graph variants
    if exact:
        return exact
    if any(only in n.lower() for n in names):  # one piece of a name, commas included ("ours, Triton")
        return [n for n in names if only in n.lower()]
    return [n for n in names if any(part.strip() and part.strip() in n.lower() for part in only.split(","))]


INSTALL_WHEELS = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
                  "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;")


def missing_imports(names: list[str]) -> str | None:
    """One line saying what to carry and how, if a selected variant's package does not import here."""
    for name in names:
        if name not in train_variants.NEEDS:
            continue
        module, pins = train_variants.NEEDS[name]
        env = {**os.environ, **train_variants.ENV.get(name, {})}
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else f"exit status {proc.returncode}"
            return (f"bench/train.py: variant {name!r} needs {' and '.join(pins)}, "
                    f"and `import {module}` fails here ({why}); make the wheels on a machine with PyPI "
                    "(`python bench/unsloth_wheels.py`: .whl/, studio/ stripped), carry .whl in the device "
                    f"call and begin its command with `{INSTALL_WHEELS}` "
                    "(bench/README.md, 'Running the Unsloth comparison')")
    return None


def merge_reports(paths: list[str]) -> tuple[dict, dict]:
    """Meta and results of several --json files of one shape.

    A --max-seq-only result joins the timed row of the same variant and --gc mode; other repeats get
    their own row, named after the --gc mode or the file."""
    meta, results = None, {}
    for path in paths:
        data = json.loads(Path(path).read_text())
        title = data.get("title") or f"{data['shape']}, {data['device']}"  # files from before titles
        if meta is None:
            meta = {k: v for k, v in data.items() if k not in ("results", "loss_agreement")}
            meta["title"] = title
        elif data["shape"] != meta["shape"]:
            raise ValueError(f"{path} is shape {data['shape']}, {paths[0]} is {meta['shape']}")
        elif title not in meta["title"].split("\n"):
            meta["title"] += f"\n{title}"
        if "settings" in data:  # files from before the MFU column do not say their sequence length
            cfg = model_config(data["shape"])
            add_mfu(data["results"], cfg, data["settings"]["seq"], data["peak_tflops"])
        for name, r in data["results"].items():
            old = results.get(name)
            if old is None:
                results[name] = r
            elif old.get("gc") != r.get("gc"):
                results[f"{name}, gc {r['gc']}"] = r
            elif "max_seq" in r and "tokens_per_s" not in r and "max_seq" not in old:
                old["max_seq"] = r["max_seq"]  # a --steps 0 --max-seq run completes the row of a timed run
            else:
                results[f"{name} [{Path(path).stem}]"] = r
    assert meta is not None
    return meta, results


def _write_json(path: str, meta: dict, results: dict) -> None:
    tmp = Path(path + ".tmp")
    data = {**meta, "results": results, "loss_agreement": loss_agreement(results)}
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def add_setting_arguments(ap: argparse.ArgumentParser, *, gc: bool = True) -> None:
    """The run settings every step benchmark takes: model shape, batch, sequence, accumulation, model cache
    and (with gc) our gradient checkpointing mode."""
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--cache", default=os.environ.get("BENCH_CACHE", str(ROOT / "bench" / "cache")),
                    help="where generated random-weight models are kept (default: $BENCH_CACHE or bench/cache)")
    if gc:
        ap.add_argument("--gc", default="on", choices=["off", "on", "offload"],
                        help="our gradient checkpointing mode (the HF stack always uses its own)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_setting_arguments(ap)
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps (0: --max-seq only)")
    ap.add_argument("--json", help="results file, written (after each variant: a cut-off run keeps the rest)")
    ap.add_argument("--markdown", action="store_true", help="also print a README-ready markdown table")
    ap.add_argument("--only", help="run only the variants whose name contains this text "
                                   "(or, comma-separated, one of these texts: --only Triton,Liger)")
    ap.add_argument("--report", nargs="+", metavar="JSON",
                    help="run nothing: print the table (and --markdown, --json) of these --json files")
    ap.add_argument("--gpus", type=int, default=1, help="ours only: data-parallel ranks (torchrun + DDP)")
    ap.add_argument("--max-seq", action="store_true",
                    help="search the longest sequence that trains at batch 1")
    ap.add_argument("--max-seq-limit", type=int, default=262144, help="longest length the search tries")
    ap.add_argument("--max-seq-lengths", help="comma-separated lengths to try instead of 8192, 16384, 32768, "
                    "49152, 65536, 98304, 131072, then every 32768 up to --max-seq-limit")
    ap.add_argument("--time-budget", type=float, default=300.0, help="seconds per variant for the search")
    ap.add_argument("--peak-tflops", type=float, default=785.0,
                    help="bf16 matmul ceiling per GPU for MFU (785: measured on the H100)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.max_seq and args.gpus > 1:
        ap.error("--max-seq measures one GPU: leave --gpus at 1")
    if args.steps < 0 or (args.steps == 0 and not args.max_seq):
        ap.error("--steps must be positive (or 0 together with --max-seq)")
    if args.report:
        try:
            meta, results = merge_reports(args.report)
        except (OSError, ValueError, KeyError) as e:
            ap.error(f"--report: {e}")
        print_table(meta, results)
        if args.markdown:
            print("\n" + markdown(meta, results))
        if args.json:
            _write_json(args.json, meta, results)
        return
    model_dir = Path(args.cache) / f"train-{args.shape}"
    try:
        lengths = tuple(int(x) for x in args.max_seq_lengths.split(",")) if args.max_seq_lengths else ()
    except ValueError:
        ap.error(f"--max-seq-lengths {args.max_seq_lengths!r}: give whole numbers separated by commas")
    settings = train_variants.Settings(args.steps, args.batch, args.seq, args.accum, args.gc, args.max_seq,
                                       args.max_seq_limit, args.time_budget, lengths)
    if args.variant:
        # bench/kernels.py would stand in for the `kernels` package, which transformers imports where installed
        sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
        result = train_variants.run(args.variant, model_dir, settings)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return
    names = _selected(args.only)
    if not names:
        ap.error(f"--only {args.only!r} matches no variant of: {', '.join(train_variants.VARIANTS)}")
    missing = missing_imports(names)
    if missing:
        print(missing, file=sys.stderr)
        sys.exit(2)
    generate(args.shape, model_dir)
    cfg = model_config(args.shape)
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    ours = any(n.startswith("ours") for n in names)
    gc_note = f"ours with gradient checkpointing {args.gc}, " if ours else ""
    meta = {"shape": args.shape, "device": dev, "settings": vars(args) | {"variant": None},
            "flops_per_token": flops_per_token(cfg, args.seq), "peak_tflops": args.peak_tflops,
            "title": f"{args.shape}, {dev}, micro-batch {args.batch} x {args.seq}, grad-accum {args.accum}, "
                     f"QLoRA r=32, {gc_note}{args.steps} steps "
                     f"(tokens/s over steps 3..), MFU of {args.peak_tflops:.0f} TFLOP/s"}
    results: dict[str, dict] = {}
    for name in names:
        if args.gpus > 1 and "CUDA graphs" in name:  # Ours builds no graphs under DDP: the row would be eager
            results[name] = {"error": "not run: CUDA graphs are off under data parallelism (trainer.loop._graphs)"}
            if args.json:
                _write_json(args.json, meta, results)
            continue
        launch = [sys.executable, __file__]
        if args.gpus > 1 and name.startswith("ours"):  # global batch = gpus x micro-batch x accum
            launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}",
                      __file__]
        print(f"running {name} ...", file=sys.stderr, flush=True)
        env = {**os.environ, **train_variants.ENV.get(name, {})}
        proc = subprocess.run([*launch, *sys.argv[1:], "--variant", name], env=env, capture_output=True,
                              text=True)
        if proc.returncode != 0:
            err = proc.stderr.strip()
            results[name] = {"error": err.splitlines()[-1] if err else f"exit status {proc.returncode}"}
            print(proc.stderr[-3000:], file=sys.stderr)
        else:
            # the result is the last line that is a JSON object (a library may print after it, at exit)
            line = next(x for x in reversed(proc.stdout.splitlines()) if x.startswith("{"))
            results[name] = json.loads(line)
            # losses are compared only between results on the same data
            results[name]["batches"] = [args.batch, args.seq, args.accum]
        add_mfu(results, cfg, args.seq, args.peak_tflops)
        if args.json:
            _write_json(args.json, meta, results)
    print_table(meta, results)
    if args.markdown:
        print("\n" + markdown(meta, results))
    assert all(math.isfinite(x) for r in results.values() for x in r.get("losses", []))


if __name__ == "__main__":
    main()
