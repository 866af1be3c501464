"""Benchmark (GPU): QLoRA training steps of a Llama-3-8B-shaped random-weight model with our trainer.

One process per variant, the same random weights, the same random token batches:
micro-batch 2 x 2048 tokens, grad-accum 4, LoRA r=32 alpha=32 on q,k,v,o,gate,up,down, NF4 base
(double quantization), bf16 autocast, paged 8-bit AdamW, gradient checkpointing on. Variants:
Triton kernels on (default on CUDA) and off (TRAINER_KERNELS=0: the plain PyTorch paths), and the
Hugging Face stack (transformers 4-bit + PEFT + SDPA + gradient checkpointing) on the same batches.
Prints a table: tokens/s after warm-up, memory after load, peak allocated/reserved, first losses.

    python bench/train.py [--steps 6] [--shape llama3-8b|tiny] [--json out.json]

The Liger-Kernel variant and the longest-sequence search of issue 7 are not in this script yet.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0),
    "tiny": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0),
}


def generate(shape: str, out: Path) -> Path:
    """Random bf16 Llama checkpoint (made on the GPU when there is one; written shard by shard)."""
    from safetensors.torch import save_file

    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", max_position_embeddings=8192,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
               torch_dtype="bfloat16", **SHAPES[shape])
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.empty(s, dtype=torch.bfloat16, device=dev).normal_(0, 0.02, generator=gen).cpu()

    weight_map: dict[str, str] = {}
    shard = {"model.embed_tokens.weight": rnd(v, h), "lm_head.weight": rnd(v, h),
             "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    save_file(shard, out / "model-embed.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, "model-embed.safetensors"))
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shard = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "self_attn.q_proj.weight": rnd(h, h), p + "self_attn.k_proj.weight": rnd(kv, h),
                 p + "self_attn.v_proj.weight": rnd(kv, h), p + "self_attn.o_proj.weight": rnd(h, h),
                 p + "mlp.gate_proj.weight": rnd(i, h), p + "mlp.up_proj.weight": rnd(i, h),
                 p + "mlp.down_proj.weight": rnd(h, i)}
        name = f"model-layer{n:03d}.safetensors"
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))
    (out / ".complete").touch()
    return out


def run_variant(model_dir: Path, steps: int, batch: int, seq: int, accum: int, gc: str = "on") -> dict:
    """Train `steps` optimizer steps in this process; returns the measurements."""
    from trainer.checkpointing import set_gradient_checkpointing
    from trainer.data import Batch
    from trainer.distributed import from_environment, shutdown, wrap
    from trainer.loop import train_step
    from trainer.lora import LoRASettings, apply_lora, trainable_parameters
    from trainer.models import load_model

    dp = from_environment("cuda")  # under torchrun: one rank per GPU, each with its own micro-batches
    dev = dp.device if dp else torch.device("cuda")
    world, rank = (dp.world_size, dp.rank) if dp else (1, 0)
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.bfloat16, device=str(dev), load_in_4bit=True)
    after_load = torch.cuda.memory_allocated() / 2**30
    apply_lora(model, LoRASettings(r=32, alpha=32.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    set_gradient_checkpointing(model, gc)
    model.train()
    import bitsandbytes as bnb

    params = trainable_parameters(model)
    if dp:
        model = wrap(model, dp)
    opt = bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    vocab = (model.module if dp else model).spec.vocab_size
    g = torch.Generator().manual_seed(1 + rank)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            ids = torch.randint(0, vocab, (batch, seq), generator=g)
            pos = torch.arange(seq).expand(batch, seq).contiguous()
            micro.append(Batch(ids.to(dev), ids.clone().to(dev), pos.to(dev), [], batch * (seq - 1)))
        torch.cuda.synchronize()
        t = time.perf_counter()
        r = train_step(model, micro, opt, sched, max_grad_norm=1.0, autocast_dtype=torch.bfloat16, device=dev, dp=dp)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(r.loss)
    warm = times[2:] or times
    shutdown(dp)
    return {
        "tokens_per_s": world * batch * seq * accum * len(warm) / sum(warm),
        "world_size": world,
        "mem_after_load_gib": after_load,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": [round(x, 4) for x in losses],
        "step_s": [round(x, 3) for x in times],
    }


def run_hf_variant(model_dir: Path, steps: int, batch: int, seq: int, accum: int, gc: str = "on") -> dict:
    """The Hugging Face stack as its docs show it: transformers 4-bit (bitsandbytes NF4, double quant),
    PEFT LoRA, SDPA attention, gradient checkpointing, paged 8-bit AdamW; same batches as ours."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dev = torch.device("cuda")
    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa", device_map={"": 0})
    after_load = torch.cuda.memory_allocated() / 2**30
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    model.train()
    opt = bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    losses, times = [], []
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        batches = [torch.randint(0, vocab, (batch, seq), generator=g).to(dev) for _ in range(accum)]
        torch.cuda.synchronize()
        t = time.perf_counter()
        total = 0.0
        for ids in batches:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss / accum
            loss.backward()
            total += float(loss)
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        losses.append(total)
    warm = times[2:] or times
    return {
        "tokens_per_s": batch * seq * accum * len(warm) / sum(warm),
        "mem_after_load_gib": after_load,
        "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "losses": [round(x, 4) for x in losses],
        "step_s": [round(x, 3) for x in times],
    }


VARIANTS = {
    "ours, Triton kernels": ({}, run_variant),
    "ours, plain PyTorch": ({"TRAINER_KERNELS": "0"}, run_variant),
    "HF transformers+PEFT": ({}, run_hf_variant),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3-8b", choices=list(SHAPES))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--cache", default=os.environ.get("BENCH_CACHE", str(ROOT / "bench" / "cache")))
    ap.add_argument("--json")
    ap.add_argument("--gc", default="on", choices=["off", "on", "offload"],
                    help="our gradient checkpointing mode (the HF stack always uses its own)")
    ap.add_argument("--only", help="run only the variants whose name contains this text")
    ap.add_argument("--gpus", type=int, default=1, help="ours only: data-parallel ranks (torchrun + DDP)")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    args = ap.parse_args()
    model_dir = Path(args.cache) / f"train-{args.shape}"
    if args.variant:
        fn = VARIANTS[args.variant][1]
        result = fn(model_dir, args.steps, args.batch, args.seq, args.accum, args.gc)
        if os.environ.get("RANK", "0") == "0":
            print(json.dumps(result))
        return
    generate(args.shape, model_dir)
    results = {}
    for name, (env, _) in VARIANTS.items():
        if args.only and args.only not in name:
            continue
        launch = [sys.executable, __file__]
        if args.gpus > 1:  # data parallel through torchrun: global batch = gpus x micro-batch x accum
            launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.gpus}", __file__]
        proc = subprocess.run([*launch, *sys.argv[1:], "--variant", name],
                              env={**os.environ, **env}, capture_output=True, text=True)
        if proc.returncode != 0:
            results[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"\n{args.shape}, {dev}, micro-batch {args.batch} x {args.seq}, grad-accum {args.accum}, QLoRA r=32, "
          f"gradient checkpointing {args.gc}, {args.steps} steps (tokens/s over steps 3..)")
    print(f"{'variant':<24}{'tokens/s':>10}{'after load':>12}{'peak alloc':>12}{'peak reserved':>15}  first losses")
    for name, r in results.items():
        if "error" in r:
            print(f"{name:<24} error: {r['error']}")
            continue
        print(f"{name:<24}{r['tokens_per_s']:>10.0f}{r['mem_after_load_gib']:>10.2f}GB"
              f"{r['peak_allocated_gib']:>10.2f}GB{r['peak_reserved_gib']:>13.2f}GB  {r['losses'][:3]}")
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "device": dev, "results": results}, indent=2))
    assert all(math.isfinite(x) for r in results.values() for x in r.get("losses", []))


if __name__ == "__main__":
    main()
