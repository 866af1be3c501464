"""Tiny base models with real PEFT adapters, and the PEFT reference they must reproduce."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from export.verify import LlamaCppFile

ALL_LINEAR = "all-linear"


def make_adapter(base_dir: Path, adapter_dir: Path, *, target_modules=ALL_LINEAR, r: int = 4, alpha: float = 8,
                 seed: int = 1, **lora_kwargs) -> Path:
    """Train-free LoRA adapter saved by PEFT itself: random A (PEFT's init) and random non-zero B."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules, **lora_kwargs)
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
            elif "lora_embedding_A" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(str(adapter_dir))
    return adapter_dir


def peft_model(base_dir: Path, adapter_dir: Path):
    """base + adapter as a user would load them: transformers model wrapped by peft.PeftModel, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def hf_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[0].float()


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge (merge_and_unload) in float32: the reference for merged tensors."""
    model = peft_model(base_dir, adapter_dir).merge_and_unload()
    return {k: v.detach().float() for k, v in model.state_dict().items()}


def run_dir_with_adapter_subdir(adapter_dir: Path, run_dir: Path) -> Path:
    """A trainer-style run dir: RUN_DIR/adapter/{adapter_config.json, adapter_model.safetensors} + other files."""
    run_dir.mkdir(parents=True)
    shutil.copytree(adapter_dir, run_dir / "adapter")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return run_dir


def chatml_llama(path: Path, **config) -> Path:
    """A Llama 2 vocabulary with <|im_start|>/<|im_end|> added as special tokens by transformers
    (whose sentencepiece tokenizers prefix only the start of the text, not text after a special token)."""
    import builders
    import sentencepiece as spm
    import testdata
    from transformers import AutoTokenizer

    chatml = ["<|im_start|>", "<|im_end|>"]
    sp_model = testdata.sentencepiece_model("llama-spm")
    vocab_size = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size() + len(chatml)
    builders.sentencepiece_checkpoint(path, sp_model, family="llama", vocab_size=vocab_size, **config)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.add_special_tokens({"additional_special_tokens": chatml})
    assert len(tok) == vocab_size
    tok.save_pretrained(str(path))
    return path


def healed_chatml_llama(path: Path, **config) -> Path:
    """A Llama 2 model given ChatML tokens by `healer fix --chatml` (its tokenizer follows llama.cpp's rule)."""
    import builders
    import testdata

    from healer.fix import repair

    source = path.with_name(path.name + "-in")
    builders.sentencepiece_checkpoint(source, testdata.sentencepiece_model("llama-spm"), family="llama", **config)
    repair(source, path, chatml=True)
    return path


LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"


def import_llama_cpp():
    """The llama_cpp module, or skip; under CI=true fail in one line instead, since CI must run these tests."""
    try:
        import llama_cpp
    except ImportError as e:
        why = (f"llama_cpp cannot be imported ({e}); `pip install -e '.[test]'` builds {LLAMA_CPP_PYTHON} "
               "from source (a C++ compiler is needed)")
        if os.environ.get("CI") == "true":
            pytest.fail(why, pytrace=False)
        pytest.skip(why)
    return llama_cpp


@pytest.fixture(scope="module")
def llama_cpp_required():
    """For `pytestmark = pytest.mark.usefixtures("llama_cpp_required")`: skip (fail under CI=true) before any work."""
    import_llama_cpp()


class LlamaCppModel(LlamaCppFile):
    """The one way tests open a GGUF in llama.cpp: export.verify.LlamaCppFile, which loads it with
    use_extra_bufts = False (llama.cpp's AMX repacking of K-quant weights segfaults on these CPUs),
    after skipping (failing under CI=true) when llama_cpp cannot be imported."""

    def __init__(self, path: Path, n_ctx: int = 512):
        import_llama_cpp()
        super().__init__(path, n_ctx)


def llama_cpp_quantize(src: Path, dst: Path, ftype) -> Path:
    """llama.cpp's own quantizer (llama-quantize's library call) on a GGUF file: the reference for our k-quants."""
    import ctypes

    lib = import_llama_cpp()
    lib.llama_backend_init()
    params = lib.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = 2
    assert lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def confident_weights(path: Path, head: float = 0.02) -> Path:
    """Make the random Llama at `path` decide its next token: embeddings 10x HF's init dominate the residual
    and the head adds `head` x a shuffled copy of them, so most positions have a clear winner in f16 (a plain
    random model's top-1 is a coin flip that any quantization noise changes). Rewrites model.safetensors."""
    from safetensors.torch import load_file, save_file

    weights = load_file(path / "model.safetensors")
    embed = weights["model.embed_tokens.weight"] * 10
    perm = torch.randperm(embed.shape[0], generator=torch.Generator().manual_seed(0))
    weights["model.embed_tokens.weight"] = embed
    weights["lm_head.weight"] = weights["lm_head.weight"] + head * embed[perm]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path


def log_probs(path: Path, ids: list[int]) -> torch.Tensor:
    """float64 next-token log-probabilities of the GGUF at `path` after each prefix of `ids`, in llama.cpp."""
    with LlamaCppModel(path) as model:
        return torch.log_softmax(model.logits(ids).double(), -1)


def kl_and_top1(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """(mean KL(ref || got), top-1 agreement) of two [positions, vocab] log-probability tensors."""
    kl = (ref.exp() * (ref - got)).sum(-1).mean()
    return float(kl), float((ref.argmax(-1) == got.argmax(-1)).double().mean())
