"""Benchmark: untrained-row detection and repair on a Llama-3-8B-shaped embedding and lm_head.

Generates once into bench/cache/embeddings/: a bf16 128,256 x 4,096 embedding and a separate
lm_head of the same shape, in two safetensors shards with an index, carrying Llama 3's
defect (254 reserved/template rows ~1e-23 in the embedding; a shared non-zero lm_head vector
for them, as in Llama 3.1). Each stage runs in a fresh subprocess, so its peak RSS is its own;
the page cache is warmed first, so the figures are CPU-bound, not disk-bound. CPU s is the
stage's process time (all threads): on a shared machine it shows the work when wall time
shows the contention.

    python bench/embeddings.py            # prints a table
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / "cache" / "embeddings"
OUT = ROOT / "out"
VOCAB, HIDDEN = 128_256, 4_096
UNTRAINED = range(128_002, 128_256)  # Llama 3's reserved and template specials
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"
SHARDS = {EMBED: "model-00001-of-00002.safetensors", LM_HEAD: "model-00002-of-00002.safetensors"}


def generate() -> Path:
    """Write the benchmark checkpoint once (about 2 GB)."""
    if (CACHE / ".complete").exists():
        return CACHE
    from safetensors.torch import save_file

    tmp = Path(tempfile.mkdtemp(dir=CACHE.parent if CACHE.parent.exists() else None))
    g = torch.Generator().manual_seed(0)
    rows = torch.tensor(list(UNTRAINED))
    shared = (torch.randn(HIDDEN, generator=g) * 0.02).to(torch.bfloat16)
    for name, shard in SHARDS.items():
        t = torch.empty(VOCAB, HIDDEN, dtype=torch.bfloat16)
        for start in range(0, VOCAB, 8192):  # chunked: no 2 GB float32 temporary
            chunk = t[start:start + 8192]
            chunk.copy_(torch.randn(chunk.shape, generator=g) * 0.02 + 0.005)
        if name == EMBED:
            t[rows] = (torch.randn(len(rows), HIDDEN, generator=g) * 1e-23).to(torch.bfloat16)
        else:
            t[rows] = shared
        save_file({name: t}, str(tmp / shard), metadata={"format": "pt"})
        del t
    size = VOCAB * HIDDEN * 2
    index = {"metadata": {"total_size": 2 * size}, "weight_map": dict(SHARDS)}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB,
              "hidden_size": HIDDEN, "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001}
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    (tmp / ".complete").touch()
    if CACHE.exists():
        shutil.rmtree(CACHE)
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(CACHE)
    return CACHE


def _protected() -> set[int]:
    return {128000, 128001}


def peak_rss_gb() -> float:
    """This process's resident-set high-water mark (VmHWM: unlike ru_maxrss, not inherited across fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def stage(name: str) -> dict:
    """Run one stage in this process; returns wall seconds and what it found."""
    from healer.doctor import Context
    from healer.embeddings import checkpoint_untrained_rows, repair_untrained, write_weights
    from healer.embeddings.checks import check_embeddings_nonfinite, check_untrained
    from healer.model_dir import ModelDir

    ckpt = ModelDir(CACHE)
    t0, c0 = time.perf_counter(), time.process_time()
    info: dict = {}
    if name == "imports only":
        info["found"] = 0
    elif name == "doctor checks":
        findings = check_untrained(ckpt, Context()) + check_embeddings_nonfinite(ckpt, Context())
        info["found"] = findings[0].details["count"] if findings else 0
    elif name == "naive float32 (reference)":
        # the common recipe: whole tensors upcast, all-rows detection, one mean per matrix
        from safetensors.torch import load_file

        embed = load_file(str(CACHE / SHARDS[EMBED]))[EMBED].float()
        head = load_file(str(CACHE / SHARDS[LM_HEAD]))[LM_HEAD].float()
        bad = torch.nonzero(embed.abs().amax(1) <= 1e-16).reshape(-1)
        keep = torch.ones(VOCAB, dtype=torch.bool)
        keep[bad] = False
        embed[bad] = embed[keep].mean(0)
        head[bad] = head[keep].mean(0)
        info["found"] = len(bad)
    else:
        untrained = checkpoint_untrained_rows(ckpt, _protected())
        info["found"] = len(untrained)
        if name in ("detect + repair", "detect + repair + write"):
            updates = repair_untrained(ckpt, sorted(untrained), untrained)
        if name == "detect + repair + write":
            OUT.mkdir(exist_ok=True)
            with tempfile.TemporaryDirectory(dir=OUT) as out:
                written = write_weights(ckpt, updates, out)
                info["rewritten"] = sum(v == "rewritten" for v in written.values())
    info["wall_s"] = time.perf_counter() - t0
    info["cpu_s"] = time.process_time() - c0
    info["peak_rss_gb"] = peak_rss_gb()
    return info


STAGES = ("detect", "detect + repair", "detect + repair + write", "doctor checks", "naive float32 (reference)")


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--stage":
        print(json.dumps(stage(sys.argv[2])))
        return
    t = time.perf_counter()
    generate()
    print(f"checkpoint: {CACHE} (generated or found in {time.perf_counter() - t:.1f} s)")
    for shard in SHARDS.values():  # warm the page cache
        with open(CACHE / shard, "rb") as f:
            while f.read(64 << 20):
                pass
    base = subprocess.run([sys.executable, __file__, "--stage", "imports only"], capture_output=True, text=True,
                          check=True)
    print(f"device: CPU, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores; "
          f"shape {VOCAB} x {HIDDEN} bf16, embed + separate lm_head ({2 * VOCAB * HIDDEN * 2 / 1e9:.2f} GB)")
    print(f"peak RSS of a process that only imports torch + healer: {json.loads(base.stdout)['peak_rss_gb']:.2f} GB")
    print()
    print(f"| {'stage':28} | {'wall s':>7} | {'CPU s':>7} | {'peak RSS GB':>11} | {'rows found':>10} |")
    print(f"|{'-' * 30}|{'-' * 9}|{'-' * 9}|{'-' * 13}|{'-' * 12}|")
    for name in STAGES:
        r = subprocess.run([sys.executable, __file__, "--stage", name], capture_output=True, text=True)
        if r.returncode != 0:
            print(f"| {name:28} | failed: {r.stderr.strip().splitlines()[-1]}")
            continue
        info = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"| {name:28} | {info['wall_s']:7.2f} | {info['cpu_s']:7.2f} | {info['peak_rss_gb']:11.2f} | "
              f"{info['found']:10} |")


if __name__ == "__main__":
    main()
