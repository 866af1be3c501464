"""Benchmark: `healer doctor` on a Llama-3-8B-shaped checkpoint (random bf16, ~16 GB).

Generates the checkpoint once into bench/cache/llama3-8b-shaped (real Llama 3 tokenizer from
llama.cpp's test vocabulary, the official Llama 3.1 template, 250 zero embedding rows for the
reserved specials, 4 shards), then times `healer doctor` in a fresh process, with and without
--check-weights, and reports wall time, CPU time (user + sys) and peak RSS (ru_maxrss).

With --tokenizer-from DIR the checkpoint takes DIR's tokenizer files (a real 128K or 262K
vocabulary, e.g. a model dir built by tests/builders.real_checkpoint) and DIR's token ids:
bench/cache/llama3-8b-shaped-NAME holds embed_tokens and lm_head sized to that vocabulary (zero
rows for its reserved/unused added tokens) and hard links to the 32 decoder layers, generated
once into bench/cache/llama3-8b-layers. --model DIR times doctor on an existing dir as it is.

    python bench/doctor.py                                      # prints a table; the README quotes it
    python bench/doctor.py --tokenizer-from DIR --repeat 3 --no-check-weights
    python bench/doctor.py --model DIR --repeat 3 --no-check-weights
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
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
LAYERS = ROOT / "bench" / "cache" / "llama3-8b-layers"
LAYERS_PER_SHARD = 4  # 1.7 GiB of bf16 in memory at a time while generating
# Llama 3's reserved specials and Gemma's <unusedN>: never trained in the base models
UNTRAINED = re.compile(r"^(<\|reserved_special_token_\d+\|>|<unused\d+>|\[control_\d+\]|<\|placeholder\d+\|>)$")
CONFIG = dict(
    architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=4096,
    intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
    max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
    bos_token_id=128000, eos_token_id=128009, torch_dtype="bfloat16",
)


def tensor_shapes(vocab_size: int = CONFIG["vocab_size"]) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = CONFIG["hidden_size"], CONFIG["intermediate_size"], vocab_size
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


def generate_with_tokenizer(src: Path) -> Path:
    """The 8B-shaped checkpoint around the tokenizer files of `src`, its embeddings sized to that vocabulary."""
    from tokenizers import Tokenizer

    from healer.model_dir import TOKENIZER_FILES, ModelDir
    from healer.tokenizers.inventory import inventory

    src_ckpt = ModelDir(src)
    src_config = src_ckpt.config
    rows = src_config.get("vocab_size") or inventory(src_ckpt).max_id + 1
    out = CACHE.parent / f"{CACHE.name}-{src.name}"
    stamp = f"{src.resolve()} {rows}"
    layer_files = generate_layers()
    if not (out / ".complete").exists() or (out / ".complete").read_text() != stamp:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        n = len(layer_files) + 2
        names = [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        fast = Tokenizer.from_file(str(src / "tokenizer.json"))
        untrained = sorted(i for i, t in fast.get_added_tokens_decoder().items() if UNTRAINED.match(t.content) and i < rows)
        gen = torch.Generator().manual_seed(0)
        weight_map = {}
        for name, fname in (("model.embed_tokens.weight", names[0]), ("lm_head.weight", names[-1])):
            t = torch.empty((rows, CONFIG["hidden_size"]), dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
            t[untrained] = 0
            save_file({name: t}, out / fname, metadata={"format": "pt"})
            weight_map[name] = fname
            del t
        for layer_file, fname in zip(layer_files, names[1:-1]):
            try:
                os.link(layer_file, out / fname)
            except OSError:
                (out / fname).symlink_to(layer_file)
            weight_map.update({k: fname for k in _header_names(layer_file)})
        shapes = dict(tensor_shapes(rows))
        total = sum(math.prod(shapes[k]) for k in weight_map) * 2
        (out / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        ids = {k: src_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src_config}
        (out / "config.json").write_text(json.dumps({**CONFIG, **ids, "vocab_size": rows}, indent=2))
        gen_config = src_ckpt.generation_config or {k: v for k, v in ids.items() if k != "pad_token_id"}
        (out / "generation_config.json").write_text(json.dumps(gen_config, indent=2))
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, out / name)
        print(f"wrote {out} ({rows} rows, {len(untrained)} zero rows)", file=sys.stderr)
        (out / ".complete").write_text(stamp)
    return out


def generate_layers() -> list[Path]:
    """The 32 decoder layers and the final norm, shared by every --tokenizer-from checkpoint (hard links)."""
    n_layers = CONFIG["num_hidden_layers"]
    n = math.ceil(n_layers / LAYERS_PER_SHARD)
    files = [LAYERS / f"layers-{k:02d}.safetensors" for k in range(n)]
    if (LAYERS / ".complete").exists():
        return files
    shutil.rmtree(LAYERS, ignore_errors=True)
    LAYERS.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    shapes = [(k, s) for k, s in tensor_shapes() if k.startswith("model.layers.") or k == "model.norm.weight"]
    for k, path in enumerate(files):
        first, last = k * LAYERS_PER_SHARD, min((k + 1) * LAYERS_PER_SHARD, n_layers)
        names = [f"model.layers.{i}." for i in range(first, last)]
        tensors = {name: torch.empty(shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen)
                   for name, shape in shapes if name.startswith(tuple(names))
                   or (name == "model.norm.weight" and path == files[-1])}
        save_file(tensors, path, metadata={"format": "pt"})
        del tensors
        print(f"wrote {path}", file=sys.stderr)
    (LAYERS / ".complete").touch()
    return files


def _header_names(path: Path) -> list[str]:
    from healer.model_dir import safetensors_header

    return [k for k in safetensors_header(path) if k != "__metadata__"]


def run_doctor(model: Path, *flags: str) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, peak RSS GiB, exit code) of `healer doctor` in a fresh process."""
    code = "import sys, cli; sys.argv = ['healer'] + sys.argv[1:]; cli.healer()"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, "doctor", str(model), "--json", *flags],
                          cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    rss = after.ru_maxrss / 2**20
    found = sorted({f["check"] for f in json.loads(proc.stdout)["findings"]}) if proc.stdout else proc.stderr[-300:]
    print(f"  findings: {found}", file=sys.stderr)
    return wall, cpu, rss, proc.returncode


def best_of(repeat: int, model: Path, *flags: str) -> tuple[float, float, float, int]:
    """The fastest of `repeat` runs (wall and CPU each at their minimum; other work on the machine only adds)."""
    runs = [run_doctor(model, *flags) for _ in range(repeat)]
    return min(r[0] for r in runs), min(r[1] for r in runs), max(r[2] for r in runs), runs[-1][3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer-from", type=Path, metavar="DIR",
                        help="use the tokenizer files and token ids of DIR (embeddings sized to its vocabulary)")
    parser.add_argument("--model", type=Path, metavar="DIR", help="time doctor on DIR as it is (nothing generated)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per command; the table shows the fastest")
    parser.add_argument("--no-check-weights", action="store_true", help="skip the --check-weights row")
    args = parser.parse_args()
    if args.model:
        model, what = args.model, f"{args.model}"
    elif args.tokenizer_from:
        model = generate_with_tokenizer(args.tokenizer_from)
        what = f"Llama-3-8B-shaped checkpoint with the tokenizer of {args.tokenizer_from}"
    else:
        model, what = generate(), "Llama-3-8B-shaped checkpoint"
    size = sum(p.stat().st_size for p in model.glob("*.safetensors")) / 2**30
    rows = [("doctor", *best_of(args.repeat, model))]
    if not args.no_check_weights:
        rows.append(("doctor --check-weights", *best_of(args.repeat, model, "--check-weights")))
    print(f"\n{what}: {size:.1f} GiB of weights; {os.cpu_count()} CPU cores; best of {args.repeat}")
    print(f"{'command':<26}{'wall (s)':>10}{'CPU (s)':>10}{'peak RSS (GiB)':>16}{'exit':>6}")
    for name, wall, cpu, rss, rc in rows:
        print(f"{name:<26}{wall:>10.1f}{cpu:>10.1f}{rss:>16.2f}{rc:>6}")
    print("(peak RSS is the maximum over the runs so far: run --check-weights second)")


if __name__ == "__main__":
    main()
