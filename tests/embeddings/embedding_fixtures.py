"""Tiny checkpoints with the real Llama 3 tokenizer and Llama-3-like untrained rows."""

import shutil
from dataclasses import dataclass
from pathlib import Path

import builders
import testdata
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
TEMPLATE_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
EMBED, LM_HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass
class Llama3Checkpoint:
    path: Path
    reserved: list[int]  # <|reserved_special_token_N|> rows, zeroed (embed and lm_head exactly 0)
    template: list[int]  # <|start_header_id|>, <|end_header_id|>, <|eot_id|>: embed ~1e-23, lm_head shared

    @property
    def zeroed(self) -> list[int]:
        return sorted(self.reserved + self.template)


def llama3_checkpoint(out: Path, *, max_shard_size: str | None = None, plant: bool = True) -> Llama3Checkpoint:
    """Tiny bf16 Llama with the Llama 3 tokenizer and 3.1 chat template; `plant` zeroes the rows
    Llama 3 base never trained: in the embedding the reserved specials are exact zeros and the
    template tokens bfloat16 values of ~1e-23 (as in the real model); in the lm_head the reserved
    rows are zeros and the template rows one shared non-zero vector (as in Llama 3.1).

    Trained embeddings share a mean direction (they are anisotropic); random initial rows do
    not, so every row gets one common offset: the trained mean is then a vector of ordinary
    size, as in a real model, instead of ~0."""
    tj = testdata.fast_tokenizer_json("llama-bpe")
    builders.fast_checkpoint(out, tj, bos_token=BOS, eos_token=EOS,
                             chat_template=testdata.template("meta-llama-Llama-3.1-8B-Instruct"),
                             dtype=torch.bfloat16, max_shard_size=max_shard_size, tie_word_embeddings=False)
    tok = Tokenizer.from_file(str(tj))
    reserved = sorted(i for i, t in tok.get_added_tokens_decoder().items()
                      if t.content.startswith("<|reserved_special_token_"))
    template = sorted(tok.token_to_id(t) for t in TEMPLATE_TOKENS)
    if plant:
        g = torch.Generator().manual_seed(7)
        tiny = (torch.randn(len(template), 64, generator=g) * 1e-23).to(torch.bfloat16)
        shared = (torch.randn(64, generator=g) * 0.02).to(torch.bfloat16)
        offset = torch.randn(64, generator=g) * 0.02
        for shard in sorted(out.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
                metadata = f.metadata()
            for name in (EMBED, LM_HEAD):
                if name in tensors:
                    tensors[name] = (tensors[name].float() + offset).to(torch.bfloat16)
            if EMBED in tensors:
                tensors[EMBED][reserved] = 0
                tensors[EMBED][template] = tiny
            if LM_HEAD in tensors:
                tensors[LM_HEAD][reserved] = 0
                tensors[LM_HEAD][template] = shared
            save_file(tensors, str(shard), metadata=metadata)
    return Llama3Checkpoint(out, reserved, template)


def copy_non_weights(src: Path, dst: Path) -> None:
    """What `healer fix` does around write_weights: every file except the weights."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, dst / f.name)


def assert_within_one_bf16_ulp(got: torch.Tensor, reference: torch.Tensor) -> None:
    """`got` (bfloat16) is the float64 `reference` rounded to bfloat16, give or take one step:
    the float32 mean sits within ~1e-7 of the float64 one, so it can round to the neighbour."""
    ref = reference.to(torch.float64)
    _, exponent = torch.frexp(ref)
    ulp = torch.pow(2.0, (exponent - 8).to(torch.float64))  # bfloat16 keeps 8 significant bits
    assert ((got.to(torch.float64) - ref).abs() <= ulp).all(), (got, ref)
