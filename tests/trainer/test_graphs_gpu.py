"""CUDA graph replay of micro-batches (trainer.graphs) against the eager step, on the GPU.

Three optimizer steps from the same start on the same micro-batches, once eagerly and once with
graphs: per-step losses and the trained LoRA weights must agree. Each step has two micro-batch
shapes with prompt tokens and padding ignored, so later steps replay graphs captured earlier (a
gradient that is overwritten instead of accumulated, or a LoRA factor cast left from before the
optimizer step, would part the two runs by far more than the tolerance). Run through the device
tool: `pytest -m gpu tests/trainer`.
"""

from __future__ import annotations

import pytest
import torch
from model_fixtures import VOCAB, hf_checkpoint

from trainer.data import IGNORE_INDEX, Batch
from trainer.graphs import MicroBatchGraphs
from trainer.loop import train_step
from trainer.lora import LoRASettings, apply_lora, fp8_layers, lora_modules, trainable_parameters
from trainer.models import load_model
from trainer.options import ModelOptions

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda") if torch.cuda.is_available() else None

# family, 4-bit base, gradient checkpointing, compute dtype, max_tokens (offload's host buffers)
CASES = {
    "llama_nf4_checkpointed_bf16": ("llama", True, "on", torch.bfloat16, None),
    "llama_16bit_fp32": ("llama", False, "off", torch.float32, None),
    "mistral_nf4_bf16": ("mistral", True, "off", torch.bfloat16, None),
    "qwen2_nf4_checkpointed_bf16": ("qwen2", True, "on", torch.bfloat16, None),
    "gemma_nf4_checkpointed_bf16": ("gemma", True, "on", torch.bfloat16, None),
    "phi3_nf4_bf16": ("phi3", True, "off", torch.bfloat16, None),
    "qwen3_nf4_checkpointed_bf16": ("qwen3", True, "on", torch.bfloat16, None),
    "gemma3_nf4_offload_bf16": ("gemma3_text", True, "offload", torch.bfloat16, 320),
    # both shapes fit the host buffers: both captured, the packed micro-batch uses them eagerly in between
    "llama_nf4_offload_bf16": ("llama", True, "offload", torch.bfloat16, 320),
    # 2 x 160 does not fit: it runs eagerly (fresh pinned copies) between replays of 3 x 97
    "qwen2_nf4_offload_small_buffers_bf16": ("qwen2", True, "offload", torch.bfloat16, 300),
    "llama_16bit_offload_fp32": ("llama", False, "offload", torch.float32, 320),
}


def _batch(gen: torch.Generator, rows: int, length: int, *, packed: bool = False) -> Batch:
    ids = torch.randint(0, VOCAB, (rows, length), generator=gen)
    labels = ids.clone()
    labels[:, : length // 3] = IGNORE_INDEX  # a prompt
    labels[0, length - 5:] = IGNORE_INDEX  # padding
    pos = torch.arange(length).expand(rows, length).contiguous()
    if packed:  # a second document from the middle of each row: not capturable, runs eagerly
        pos = torch.cat([torch.arange(length // 2), torch.arange(length - length // 2)]).expand(rows, length).contiguous()
    return Batch(ids, labels, pos, [], int((labels[:, 1:] != IGNORE_INDEX).sum()))


def _steps(packed_step: bool) -> list[list[Batch]]:
    gen = torch.Generator().manual_seed(3)
    steps = [[_batch(gen, 2, 160), _batch(gen, 3, 97)] for _ in range(3)]
    if packed_step:
        steps[1].append(_batch(gen, 2, 160, packed=True))
    return steps


def _train(model_dir, four_bit: bool, gc: str, dtype: torch.dtype, steps, graphs: bool,
           max_tokens: int | None = None, fp8: bool = False):
    torch.manual_seed(0)
    model = load_model(model_dir, dtype=torch.bfloat16 if dtype == torch.bfloat16 else torch.float32,
                       device="cuda", load_in_4bit=four_bit, options=ModelOptions(recompute=gc, fp8=fp8))
    apply_lora(model, LoRASettings(r=8, alpha=16))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B != 0: every LoRA product counts from the first step
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=gen) * 0.05)
    if fp8:
        assert fp8_layers(model) > 0
    model.train()
    params = trainable_parameters(model)
    start = {n: p.detach().double().cpu() for n, p in model.named_parameters() if p.requires_grad}
    # plain SGD: each step's update is the clipped gradient itself, so comparing updates compares gradients
    opt = torch.optim.SGD(params, lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    runner = (MicroBatchGraphs(model, params, autocast_dtype=dtype, device=CUDA, max_tokens=max_tokens)
              if graphs else None)
    losses = [train_step(model, step, opt, sched, max_grad_norm=1.0, autocast_dtype=dtype, device=CUDA,
                         graphs=runner).loss for step in steps]
    updates = {n: p.detach().double().cpu() - start[n] for n, p in model.named_parameters() if p.requires_grad}
    return losses, updates, runner


@pytest.mark.parametrize("case", CASES)
def test_graph_replay_trains_like_the_eager_step(tmp_path, case):
    family, four_bit, gc, dtype, max_tokens = CASES[case]
    hf_checkpoint(tmp_path, family, hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    packed = family == "llama"
    steps = _steps(packed)
    eager_losses, eager_updates, _ = _train(tmp_path, four_bit, gc, dtype, steps, graphs=False)
    losses, updates, runner = _train(tmp_path, four_bit, gc, dtype, steps, graphs=True, max_tokens=max_tokens)
    fits = [s for s in [(2, 160), (3, 97)] if max_tokens is None or s[0] * s[1] <= max_tokens]
    assert runner.reason is None and sorted(runner.captured) == fits
    assert runner.replays == 3 * len(fits)  # the packed micro-batch, and any too large, took the eager path
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    for step, (a, b) in enumerate(zip(losses, eager_losses, strict=True)):
        assert abs(a - b) <= tol * abs(b), f"step {step}: {a} vs {b}"
    for name, ref in eager_updates.items():
        err = ((updates[name] - ref).norm() / ref.norm()).item()
        assert err <= 10 * tol, f"{name}: update differs by {err:.2e} (relative)"


@pytest.mark.parametrize("gc", ["on", "offload"])
def test_fp8_forward_products_replay_like_their_eager_step(tmp_path, gc):
    """--fp8 under CUDA graphs: the e4m3 casts and products (and the row scales made in the warm-up) captured
    and replayed, against the same FP8 model run eagerly; and the FP8 run near the bf16 one."""
    hf_checkpoint(tmp_path, "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    steps = _steps(False)
    max_tokens = 320 if gc == "offload" else None
    eager_losses, eager_updates, _ = _train(tmp_path, True, gc, torch.bfloat16, steps, graphs=False, fp8=True)
    losses, updates, runner = _train(tmp_path, True, gc, torch.bfloat16, steps, graphs=True, max_tokens=max_tokens,
                                     fp8=True)
    assert runner.reason is None and runner.replays == 6
    for step, (a, b) in enumerate(zip(losses, eager_losses, strict=True)):
        assert abs(a - b) <= 3e-3 * abs(b), f"step {step}: {a} vs {b}"
    for name, ref in eager_updates.items():
        err = ((updates[name] - ref).norm() / ref.norm()).item()
        assert err <= 3e-2, f"{name}: update differs by {err:.2e} (relative)"
    bf16_losses, _, _ = _train(tmp_path, True, gc, torch.bfloat16, steps, graphs=False)
    for a, b in zip(losses, bf16_losses, strict=True):
        assert abs(a - b) <= 2e-2 * abs(b), (losses, bf16_losses)


@pytest.mark.parametrize(("packing", "gc"), [(False, "on"), (True, "on"), (False, "offload")],
                         ids=["rows", "packed", "rows-offload"])
def test_trainer_run_with_cuda_graphs_trains_like_without(tmp_path, packing, gc):
    """The CLI end to end on the GPU: the demo's repaired checkpoint and chats (rows of many lengths, padded to
    a few; lm_head trained as a whole module), `trainer run` with and without --cuda-graphs. Packed rows run
    eagerly under --cuda-graphs (trainer.graphs), and must train as they do without it."""
    import json
    import re
    import subprocess
    import sys
    from pathlib import Path

    from healer.example import build_example, write_chat_dataset
    from healer.fix import repair

    build_example(tmp_path / "flawed", hidden_size=128, num_layers=2)
    repair(tmp_path / "flawed", tmp_path / "fixed", chatml=True)
    write_chat_dataset(tmp_path / "chats.jsonl", 400, 0)
    losses = {}
    for flag in ("--no-cuda-graphs", "--cuda-graphs"):
        out = tmp_path / flag.strip("-")
        cmd = [sys.executable, "-m", "trainer", "run", "--model", str(tmp_path / "fixed"), "--data",
               str(tmp_path / "chats.jsonl"), "--out", str(out), "--device", "cuda", "--max-steps", "12",
               "--batch-size", "8", "--grad-accum", "2", "--lr", "2e-3", "--warmup-steps", "2",
               "--max-seq-len", "256" if packing else "64", "--modules-to-save", "lm_head",
               "--gradient-checkpointing", gc, "--packing" if packing else "--no-packing", flag]
        proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "CUDA graph capture" not in proc.stderr and "is off for this run" not in proc.stderr, proc.stderr[-3000:]
        assert (out / "adapter" / "adapter_model.safetensors").is_file()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [r["loss"] for r in records]
        summary = (out / "summary.txt").read_text()
        if flag == "--cuda-graphs":
            replayed, total, shapes = map(int, re.search(r"cuda graphs +(\d+) of (\d+) micro-batches replayed, "
                                                         r"(\d+) shape", summary).groups())
            if packing:  # a row holding a single chat has plain positions and may still be captured
                assert total >= 12 and replayed < total, summary
            else:  # padded to repeating lengths, every micro-batch is replayed (captures too)
                assert total == replayed == 24 and 1 <= shapes <= 4, summary
        else:
            assert "cuda graphs" not in summary
    eager, graphs = losses["--no-cuda-graphs"], losses["--cuda-graphs"]
    assert len(eager) == len(graphs) == 12 and graphs[-1] < graphs[0]
    for step, (a, b) in enumerate(zip(graphs, eager, strict=True)):
        assert abs(a - b) <= 1e-2 * abs(b), f"step {step + 1}: {a} vs {b}"
