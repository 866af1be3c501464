"""Benchmark: `healer doctor` on a Llama-3-8B-shaped checkpoint (random bf16, 4 shards, ~16 GB).

Generates the checkpoint once into bench/cache/llama3-8b-shaped (real Llama 3 tokenizer from
llama.cpp's test vocabulary, the official Llama 3.1 template, 250 zero embedding rows for the
reserved specials), then times `healer doctor` in a fresh process, with and without
--check-weights, and reports wall time and peak RSS (the process's ru_maxrss).

    python bench/doctor.py            # prints a table; the README quotes it
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
import testdata  # noqa: E402

CACHE = ROOT / "bench" / "cache" / "llama3-8b-shaped"
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128009, torch_dtype="bfloat16",
)


def tensor_shapes() -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], CONFIG["vocab_size"]
    kv = h // CONFIG["num_attention_heads"] * CONFIG["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(CONFIG["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    return out + [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]


def generate() -> Path:
    if (CACHE / ".complete").exists():
        shutil.copyfile(testdata.fast_tokenizer_json("llama-bpe"), CACHE / "tokenizer.json")
        return CACHE
    shutil.rmtree(CACHE, ignore_errors=True)
    CACHE.mkdir(parents=True)
    shapes = tensor_shapes()
    total = sum(math.prod(s) for _, s in shapes) * 2
    per_shard = total / 4
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = math.prod(shape) * 2
        if size + nbytes > per_shard and len(shards) < 4:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    gen = torch.Generator().manual_seed(0)
    reserved = [128002, 128003, 128004, 128005, *range(128008, 128256)]  # Llama 3 base: never trained
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape in shard:
            t = torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                t[reserved] = 0
            tensors[name] = t
            weight_map[name] = fname
        save_file(tensors, CACHE / fname, metadata={"format": "pt"})
        del tensors
        print(f"wrote {fname}", file=sys.stderr)
    (CACHE / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (CACHE / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (CACHE / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]}))
    shutil.copyfile(testdata.fast_tokenizer_json("llama-bpe"), CACHE / "tokenizer.json")
    tj = json.loads((CACHE / "tokenizer.json").read_text())
    (CACHE / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": testdata.template("meta-llama-Llama-3.1-8B-Instruct"), "model_max_length": 131072,
    }, indent=2))
    assert tj["model"]["type"] == "BPE"
    (CACHE / ".complete").touch()
    return CACHE


def run_doctor(*flags: str) -> tuple[float, float, int]:
    """(wall seconds, peak RSS GiB, exit code) of `healer doctor` in a fresh process."""
    code = "import sys, cli; sys.argv = ['healer'] + sys.argv[1:]; cli.healer()"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "doctor", str(CACHE), "--json", *flags],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    found = sorted({f["check"] for f in json.loads(proc.stdout)["findings"]}) if proc.stdout else proc.stderr[-300:]
    print(f"  findings: {found}", file=sys.stderr)
    return wall, rss, proc.returncode


def main() -> None:
    generate()
    size = sum(p.stat().st_size for p in CACHE.glob("*.safetensors")) / 2**30
    rows = [("doctor", *run_doctor()), ("doctor --check-weights", *run_doctor("--check-weights"))]
    print(f"\nLlama-3-8B-shaped checkpoint: {size:.1f} GiB in 4 shards; {os.cpu_count()} CPU cores")
    print(f"{'command':<26}{'wall (s)':>10}{'peak RSS (GiB)':>16}{'exit':>6}")
    for name, wall, rss, rc in rows:
        print(f"{name:<26}{wall:>10.1f}{rss:>16.2f}{rc:>6}")
    print("(peak RSS is the maximum over the runs so far: run --check-weights second)")


if __name__ == "__main__":
    main()
