"""`trainer export --verify`: run the written GGUF in llama.cpp on the run's own data, against transformers.

For the first examples of the run's dataset, rendered with the run's template exactly as training
rendered them: llama.cpp's tokenization of the text (its own BOS rule, special tokens parsed) must
equal the ids the model was trained on, or the file will be served other tokens than it learned;
and on those ids llama.cpp's next-token distributions are compared with the merged model in
transformers (base + adapter through PEFT, float32): top-1 agreement and mean KL(transformers || llama.cpp).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from export.errors import ExportError, UnsupportedError
from export.source import open_source
from healer.outputs import write_atomic

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
def result_path(gguf_path: Path) -> Path:
    """Where verify_gguf writes its result: beside the file, named after it (model.gguf -> model.gguf.verify.json),
    so the checks of several exports into one directory do not overwrite each other."""
    return gguf_path.with_name(gguf_path.name + ".verify.json")


@dataclass
class ExampleCheck:
    """One dataset example: whether llama.cpp tokenizes it as training did, and how close its logits are."""

    where: str
    tokens: int
    ids_equal: bool
    top1: float
    kl: float
    first_difference: int | None = None


@dataclass
class VerifyResult:
    gguf: str
    examples: list[ExampleCheck]

    @property
    def ids_equal(self) -> bool:
        return all(e.ids_equal for e in self.examples)

    @property
    def top1(self) -> float:
        """Top-1 agreement over all positions of all examples."""
        return sum(e.top1 * e.tokens for e in self.examples) / sum(e.tokens for e in self.examples)

    @property
    def kl(self) -> float:
        """Mean KL over all positions of all examples."""
        return sum(e.kl * e.tokens for e in self.examples) / sum(e.tokens for e in self.examples)

    def to_json(self) -> dict:
        return {"gguf": self.gguf, "ids_equal": self.ids_equal, "top1": self.top1, "kl": self.kl,
                "examples": [asdict(e) for e in self.examples]}


def require_llama_cpp():
    """The llama_cpp module, or an UnsupportedError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise UnsupportedError(f"--verify runs the GGUF in llama.cpp: pip install {LLAMA_CPP_PYTHON} "
                               "(builds llama.cpp from source; needs a C++ compiler)") from None
    return llama_cpp


class LlamaCppFile:
    """A GGUF file opened in llama.cpp itself through llama-cpp-python's C API: its tokenizer and logits.

    Not llama_cpp.Llama: that class gives no access to the model parameters, and use_extra_bufts
    must be off (below).
    """

    def __init__(self, path: str | Path, n_ctx: int = 512):
        self.lib = lib = require_llama_cpp()
        lib.llama_backend_init()
        # llama-cpp-python prints llama.cpp's log through this logger; Llama(verbose=False) sets the same
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        params = lib.llama_model_default_params()
        # On CPUs with AMX, llama.cpp's CPU backend repacks K-quant weights into an extra buffer type
        # for it, and llama-cpp-python 0.3.36 built from source segfaults evaluating such a model
        # (measured on our 2-core CI machines, llama.cpp's own Q4_K_M files included). Off, the
        # weights stay in plain CPU buffers and every type runs.
        params.use_extra_bufts = False
        self.model = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise ExportError(f"{path}: llama.cpp cannot load this file")
        if n_ctx < 1:
            raise ExportError("n_ctx must be positive")
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = ctx_params.n_batch = ctx_params.n_ubatch = n_ctx
        ctx_params.n_threads = ctx_params.n_threads_batch = os.cpu_count() or 1
        self.ctx = lib.llama_init_from_model(self.model, ctx_params)
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """llama.cpp's ids for `text`: with its own BOS rule if add_special, special tokens parsed if parse_special."""
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        return list(buf[:max(n, 0)])

    def logits(self, ids: list[int]) -> torch.Tensor:
        """float32 [len(ids), n_vocab]: the next-token logits after each prefix of `ids`, from an empty cache."""
        lib = self.lib
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        batch = lib.llama_batch_init(len(ids), 0, 1)
        try:
            batch.n_tokens = len(ids)
            for i, token in enumerate(ids):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            if lib.llama_decode(self.ctx, batch) != 0:
                raise ExportError("llama.cpp failed to evaluate the GGUF")
            out = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(len(ids), self.n_vocab))
            return torch.from_numpy(out.copy())
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def __enter__(self) -> LlamaCppFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _run_examples(run_dir: Path, ckpt, limit: int):
    """(where, llama.cpp input text, add BOS?, parse special tokens?, training ids) of the run's first examples."""
    from healer.templates.formats import normalize
    from healer.templates.render import render_source
    from healer.tokenizers.bos import bos_first, drop_template_bos
    from trainer.config import resolve_config
    from trainer.data import ExampleRenderer, load_rows, resolve_template

    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir}: --verify needs the run dir (its config.yaml names the data and template)")
    config = resolve_config(run_dir / "config.yaml", out=str(run_dir))
    tokenizer = ckpt.hf_tokenizer()
    template = resolve_template(config.template, ckpt.chat_template, ckpt.path, bos_token=tokenizer.bos_token,
                                eos_token=tokenizer.eos_token)
    bos_id = bos_first(ckpt)
    render = ExampleRenderer(tokenizer, template, bos_id)
    rows, where = load_rows(config.data)
    out = []
    for i, row in enumerate(rows[:limit]):
        example = normalize(row, where[i])
        ids, _ = render(example.messages if example.messages is not None else example.text, train_on_inputs=True)
        if example.messages is None:
            plain = ids[:-1] if tokenizer.eos_token_id is not None else ids  # training appends EOS to plain text
            out.append((where[i], example.text, True, False, plain))
            continue
        text = render_source(template.source, example.messages, name=template.name, **render.variables)
        text, _ = drop_template_bos(text, tokenizer.bos_token if bos_id is not None else None)
        out.append((where[i], text, True, True, ids))
    return out


def verify_gguf(source: str | Path, gguf_path: str | Path, *, base: str | Path | None = None, examples: int = 8,
                max_tokens: int = 256) -> VerifyResult:
    """Check the GGUF at `gguf_path` (exported from the run dir `source`) in llama.cpp; writes result_path(gguf_path)."""
    require_llama_cpp()
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    gguf_path = Path(gguf_path)
    src = open_source(source, base)
    cases = _run_examples(Path(source), src.base, examples)
    model = AutoModelForCausalLM.from_pretrained(str(src.base.path), dtype=torch.float32)
    if src.adapter is not None:
        model = PeftModel.from_pretrained(model, str(src.adapter.path)).merge_and_unload()
    model.eval()
    llama = LlamaCppFile(gguf_path, n_ctx=max_tokens)
    checks = []
    try:
        for where, text, add_special, parse_special, ids in cases:
            served = llama.tokenize(text, add_special, parse_special)
            first = next((i for i, (a, b) in enumerate(zip(served, ids)) if a != b),
                         None if len(served) == len(ids) else min(len(served), len(ids)))
            ids = ids[:max_tokens]
            with torch.no_grad():
                want = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
            got = torch.log_softmax(llama.logits(ids).double(), -1)
            kl = float((want.exp() * (want - got)).sum(-1).mean())
            top1 = float((want.argmax(-1) == got.argmax(-1)).double().mean())
            checks.append(ExampleCheck(where, len(ids), first is None, top1, kl, first))
    finally:
        llama.close()
    result = VerifyResult(str(gguf_path), checks)
    write_atomic(result_path(gguf_path), json.dumps(result.to_json(), indent=2) + "\n")
    return result
