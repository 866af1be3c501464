"""A lazy, read-only view of a Hugging Face model directory.

Nothing is read until asked for; weights are read one tensor at a time through
safetensors memory maps, so a 16 GB checkpoint costs only the tensors you touch.
"""

from __future__ import annotations

import json
import struct
from functools import cached_property
from pathlib import Path
from typing import Any

from healer.errors import CheckpointError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
EMBED_NAMES = ("model.embed_tokens.weight", "embed_tokens.weight", "transformer.wte.weight",
               "model.language_model.embed_tokens.weight")
LM_HEAD_NAMES = ("lm_head.weight", "output.weight", "model.lm_head.weight")


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning any failure into a CheckpointError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from e


def safetensors_header(path: Path) -> dict[str, Any]:
    """Read and validate a safetensors header; checks the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise CheckpointError(f"{path}: corrupt safetensors header (claims {n} header bytes, file has {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from e
    try:
        header = json.loads(raw)
        assert isinstance(header, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not valid JSON)") from e
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header needs {8 + n + end} bytes, file has {size})")
    return header


class Checkpoint:
    """Read-only view of a model dir: config, tokenizer files, chat template and tensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such directory")
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face model directory)")
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path}: no config.json (not a Hugging Face model directory)")

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r})"

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def _json(self, name: str) -> Any:
        p = self.file(name)
        return None if p is None else read_json(p)

    # --- configuration -------------------------------------------------------------------

    @cached_property
    def config(self) -> dict[str, Any]:
        cfg = self._json("config.json")
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{self.path / 'config.json'}: expected a JSON object")
        return cfg

    @cached_property
    def generation_config(self) -> dict[str, Any] | None:
        return self._json("generation_config.json")

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    # --- tokenizer files -----------------------------------------------------------------

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        return self._json("tokenizer_config.json") or {}

    @cached_property
    def special_tokens_map(self) -> dict[str, Any]:
        return self._json("special_tokens_map.json") or {}

    @cached_property
    def added_tokens_json(self) -> dict[str, int]:
        return self._json("added_tokens.json") or {}

    @cached_property
    def tokenizer_json(self) -> dict[str, Any] | None:
        return self._json("tokenizer.json")

    @property
    def has_fast(self) -> bool:
        return self.file("tokenizer.json") is not None

    @property
    def has_sentencepiece(self) -> bool:
        return self.file("tokenizer.model") is not None

    @property
    def has_tokenizer(self) -> bool:
        return self.has_fast or self.has_sentencepiece

    @cached_property
    def chat_template(self) -> str | None:
        """The default chat template, from chat_template.jinja, chat_template.json or tokenizer_config."""
        p = self.file("chat_template.jinja")
        if p is not None:
            return p.read_text(encoding="utf-8")
        ct = self._json("chat_template.json")
        if isinstance(ct, dict) and ct.get("chat_template"):
            return ct["chat_template"]
        tpl = self.tokenizer_config.get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return tpl or None

    def special_token(self, name: str) -> str | None:
        """Content of bos/eos/pad/unk token as tokenizer_config (or special_tokens_map) declares it."""
        key = f"{name}_token"
        value = self.tokenizer_config.get(key, self.special_tokens_map.get(key))
        if isinstance(value, dict):
            value = value.get("content")
        return value or None

    def sentencepiece(self):
        """The sentencepiece processor of tokenizer.model (the ground truth for slow tokenizers)."""
        import sentencepiece as spm

        p = self.file("tokenizer.model")
        if p is None:
            raise CheckpointError(f"{self.path}: no tokenizer.model")
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(p.read_bytes())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ messages
            raise CheckpointError(f"{p}: not a valid sentencepiece model ({str(e).splitlines()[0]})") from e
        return sp

    def fast_tokenizer(self):
        """The `tokenizers.Tokenizer` of tokenizer.json (parsed once: a 128K vocabulary takes seconds)."""
        if "_fast" not in self.__dict__:
            self.__dict__["_fast"] = self._load_fast()
        return self.__dict__["_fast"]

    def _load_fast(self):
        from tokenizers import Tokenizer

        p = self.file("tokenizer.json")
        if p is None:
            raise CheckpointError(f"{self.path}: no tokenizer.json")
        _ = self.tokenizer_json  # parse first: a clear JSON error before tokenizers' own
        try:
            return Tokenizer.from_file(str(p))
        except Exception as e:
            raise CheckpointError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e

    def hf_tokenizer(self):
        """The tokenizer `transformers.AutoTokenizer` gives a user for this directory (loaded once)."""
        if "_hf_tokenizer" not in self.__dict__:
            self.__dict__["_hf_tokenizer"] = self._load_hf_tokenizer()
        return self.__dict__["_hf_tokenizer"]

    def _load_hf_tokenizer(self):
        import transformers

        for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "tokenizer.json"):
            self._json(name)  # clear errors for broken JSON before transformers' tracebacks
        if self.has_sentencepiece:
            self.sentencepiece()
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            return transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{self.path}: transformers cannot load the tokenizer ({msg})") from e
        finally:
            transformers.logging.set_verbosity(verbosity)

    # --- weights -------------------------------------------------------------------------

    @cached_property
    def weight_map(self) -> dict[str, Path]:
        """Tensor name -> file holding it (safetensors preferred, torch .bin as a fallback)."""
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = self.file(index_name)
            if index_path is None:
                continue
            index = read_json(index_path)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict):
                raise CheckpointError(f"{index_path}: no weight_map")
            files = {f: self.path / f for f in set(wm.values())}
            for p in files.values():
                if not p.is_file():
                    raise CheckpointError(f"{index_path}: lists {p.name}, which is missing")
            return {name: files[f] for name, f in wm.items()}
        shards = sorted(self.path.glob("*.safetensors"))
        if shards:
            return {name: p for p in shards for name in self._header(p) if name != "__metadata__"}
        bins = sorted(self.path.glob("pytorch_model*.bin"))
        return {name: p for p in bins for name in self._bin(p)}

    @property
    def has_weights(self) -> bool:
        return bool(self.weight_map)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def _header(self, path: Path) -> dict[str, Any]:
        cache = self.__dict__.setdefault("_headers", {})
        if path not in cache:
            cache[path] = safetensors_header(path)
        return cache[path]

    def _bin(self, path: Path) -> dict[str, Any]:
        import torch

        cache = self.__dict__.setdefault("_bins", {})
        if path not in cache:
            try:
                cache[path] = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise CheckpointError(f"{path}: cannot read PyTorch weights ({str(e).splitlines()[0]})") from e
        return cache[path]

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        path = self._locate(name)
        if path.suffix == ".safetensors":
            return tuple(self._header(path)[name]["shape"])
        return tuple(self._bin(path)[name].shape)

    def tensor(self, name: str):
        """Read one tensor (a torch.Tensor on CPU) without touching the others."""
        from safetensors import safe_open

        path = self._locate(name)
        if path.suffix != ".safetensors":
            return self._bin(path)[name]
        self._header(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read tensor {name} ({str(e).splitlines()[0]})") from e

    def _locate(self, name: str) -> Path:
        try:
            return self.weight_map[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name}") from None

    def _first_present(self, names: tuple[str, ...]) -> str | None:
        wm = self.weight_map
        for n in names:
            if n in wm:
                return n
        return None

    @property
    def embed_name(self) -> str | None:
        return self._first_present(EMBED_NAMES)

    @property
    def lm_head_name(self) -> str | None:
        return self._first_present(LM_HEAD_NAMES)

    @property
    def embedding_rows(self) -> int | None:
        """Rows of the input embedding (from the tensor when present, else config.vocab_size)."""
        if self.embed_name is not None:
            return self.tensor_shape(self.embed_name)[0]
        n = self.config.get("vocab_size")
        return int(n) if isinstance(n, int) else None

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers' default is True for most decoder configs when the key is absent
        return bool(self.config.get("tie_word_embeddings", self.model_type in ("gemma", "gemma2", "gemma3_text")))
