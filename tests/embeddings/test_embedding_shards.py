"""write_weights and grow_embeddings on tiny transformers checkpoints; transformers is the reader."""

import hashlib
import json
import os
import tempfile
from pathlib import Path

import builders
import pytest
import torch
from embedding_fixtures import assert_within_one_bf16_ulp, copy_non_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from healer.embeddings import grow_embeddings, repair_untrained, untrained_rows, write_weights
from healer.errors import CheckpointError, OutputError
from healer.model_dir import ModelDir, safetensors_header

EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


def _state(path: Path) -> dict[str, tuple[str, int]]:
    return {f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in path.iterdir()}


def _load_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path))


def _set_vocab_size(path: Path, n: int) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg["vocab_size"] = n
    (path / "config.json").write_text(json.dumps(cfg))


def _reference_mean(matrix: torch.Tensor, untrained) -> torch.Tensor:
    keep = torch.ones(len(matrix), dtype=torch.bool)
    keep[list(untrained)] = False
    return matrix.to(torch.float64)[keep].mean(0)


@pytest.fixture(scope="module")
def tied_sharded(tmp_path_factory) -> Path:
    """Tied float32 Llama, vocab 1000, in three shards; the embedding alone in the first; rows 5..9 zero."""
    out = tmp_path_factory.mktemp("tied") / "model"
    builders.save_tiny_model(out, "llama", 1000, max_shard_size="200KB", tie_word_embeddings=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    shard = out / index[EMBED]
    tensors = load_file(str(shard))
    tensors[EMBED][5:10] = 0
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return out


def test_growing_a_tied_embedding_rewrites_only_its_shard_and_transformers_sees_the_new_rows(tied_sharded, tmp_path):
    src = tied_sharded
    before = _state(src)
    ckpt = ModelDir(src)
    updates = grow_embeddings(ckpt, 2)
    assert list(updates) == [EMBED]  # tied, no lm_head stored: one tensor
    out = tmp_path / "out"
    copy_non_weights(src, out)
    _set_vocab_size(out, 1002)
    written = write_weights(ckpt, updates, out)

    assert _state(src) == before  # the input is never touched
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    embed_shard = index[EMBED]
    for name, how in written.items():
        if name.endswith(".safetensors"):
            same = (src / name).read_bytes() == (out / name).read_bytes()
            assert same == (name != embed_shard), name
            assert how == ("rewritten" if name == embed_shard else "linked")
            if how == "linked":
                assert os.path.samefile(src / name, out / name)

    old = load_file(str(src / embed_shard))[EMBED]
    expected = _reference_mean(old, range(5, 10)).to(torch.float32)
    model = _load_model(out)
    emb = model.get_input_embeddings().weight.detach()
    assert emb.shape == (1002, 64)
    assert torch.equal(emb[:1000], old)
    torch.testing.assert_close(emb[1000:], expected.expand(2, -1), rtol=1e-6, atol=1e-7)
    assert torch.equal(model.get_output_embeddings().weight, model.get_input_embeddings().weight)
    logits = model(input_ids=torch.tensor([[1, 1000, 1001]])).logits
    assert logits.shape == (1, 3, 1002) and torch.isfinite(logits).all()


def test_rewritten_shard_keeps_tensor_order_dtypes_and_metadata(tied_sharded, tmp_path):
    ckpt = ModelDir(tied_sharded)
    out = tmp_path / "out"
    out.mkdir()
    write_weights(ckpt, grow_embeddings(ckpt, 3), out)
    name = ckpt.weight_map[EMBED].name
    old, new = safetensors_header(tied_sharded / name), safetensors_header(out / name)
    assert list(old) == list(new) and old["__metadata__"] == new["__metadata__"] == {"format": "pt"}
    for k in old:
        if k != "__metadata__":
            assert new[k]["dtype"] == old[k]["dtype"]
            assert new[k]["shape"] == (old[k]["shape"] if k != EMBED else [1003, 64])
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for f in out.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as g:
            tensors.update({k: g.get_tensor(k) for k in g.keys()})
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert index["metadata"]["total_parameters"] == sum(t.numel() for t in tensors.values())


def test_untied_single_file_repair_uses_each_matrix_own_trained_mean(tmp_path):
    src = tmp_path / "src"
    builders.save_tiny_model(src, "llama", 300, tie_word_embeddings=False, dtype=torch.bfloat16)
    (shard,) = src.glob("*.safetensors")
    tensors = load_file(str(shard))
    rows = [3, 4, 250]
    tensors[EMBED][rows] = 0
    tensors[LM_HEAD][rows] = 0.5  # identical non-zero rows (Llama 3.1): must not enter the lm_head mean
    tensors[LM_HEAD] += 0.01  # a mean far from the embedding's
    save_file(tensors, str(shard), metadata={"format": "pt"})
    ckpt = ModelDir(src)
    untrained = untrained_rows(tensors[EMBED], tensors[LM_HEAD])
    assert sorted(untrained) == rows
    updates = repair_untrained(ckpt, [3, 250], untrained)
    out = tmp_path / "out"
    copy_non_weights(src, out)
    assert write_weights(ckpt, updates, out) == {shard.name: "rewritten"}
    assert not (out / "model.safetensors.index.json").exists()
    model = _load_model(out)
    for name, got in ((EMBED, model.get_input_embeddings().weight), (LM_HEAD, model.get_output_embeddings().weight)):
        for r in (3, 250):
            assert_within_one_bf16_ulp(got[r].detach(), _reference_mean(tensors[name], rows))
        assert torch.equal(got[4].detach(), tensors[name][4])
    assert (model.get_output_embeddings().weight[3].float() - model.get_input_embeddings().weight[3].float()
            ).abs().max() > 1e-3


def test_unchanged_shards_are_copied_across_filesystems(tied_sharded):
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tied_sharded).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test data")
    ckpt = ModelDir(tied_sharded)
    with tempfile.TemporaryDirectory(dir="/dev/shm") as tmp:
        written = write_weights(ckpt, {}, tmp)
        shards = sorted(p.name for p in tied_sharded.glob("*.safetensors"))
        assert {k: v for k, v in written.items() if k.endswith(".safetensors")} == dict.fromkeys(shards, "copied")
        for name in shards:
            assert (Path(tmp) / name).read_bytes() == (tied_sharded / name).read_bytes()


def test_write_weights_refuses_existing_files_and_bin_checkpoints(tied_sharded, tmp_path):
    ckpt = ModelDir(tied_sharded)
    out = tmp_path / "out"
    out.mkdir()
    (out / ckpt.weight_map[EMBED].name).write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        write_weights(ckpt, {}, out)
    with pytest.raises(OutputError, match="does not exist"):
        write_weights(ckpt, {}, tmp_path / "missing")
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({EMBED: torch.ones(4, 8)}, binary / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only safetensors"):
        write_weights(ModelDir(binary), {}, out)
