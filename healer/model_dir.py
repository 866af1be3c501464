"""A lazy, read-only view of a Hugging Face model directory.

Nothing is read until asked for; weights are read one tensor at a time through
safetensors memory maps, so a 16 GB checkpoint costs only the tensors you touch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import tempfile
import weakref
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
# bytes per element of the safetensors dtypes (the format's own list)
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4,
               "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


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
    end = _check_entries(path, header)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated safetensors file (header needs {8 + n + end} bytes, file has {size})")
    return header


def _check_entries(path: Path, header: dict[str, Any]) -> int:
    """Every tensor entry well formed, sized as its dtype and shape say, none overlapping; the data's end."""
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{path}: corrupt safetensors header: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where} is a {type(entry).__name__}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(dtype, str) or not isinstance(shape, list) or not all(
                isinstance(d, int) and d >= 0 for d in shape):
            raise CheckpointError(f"{where} has no valid dtype and shape")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{where} has no valid data_offsets [start, end]")
        numel = 1
        for d in shape:
            numel *= d
        if dtype in ST_ITEMSIZE and offsets[1] - offsets[0] != numel * ST_ITEMSIZE[dtype]:
            raise CheckpointError(f"{where} holds {offsets[1] - offsets[0]} bytes, but {dtype} {shape} needs "
                                  f"{numel * ST_ITEMSIZE[dtype]}")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise CheckpointError(f"{path}: corrupt safetensors header: the data of tensors {a!r} and {b!r} "
                                  "overlap")
    return max((end for _, end, _ in spans), default=0)


class ModelDir:
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
        return f"ModelDir({str(self.path)!r})"

    def _native(self, p: Path) -> str:
        """`p` (this dir or a file in it) as a path the Rust libraries (tokenizers, safetensors) can open.

        They take only UTF-8 paths; a dir whose name is not (Linux allows any bytes) is reached through a
        symlink with a plain name in a temp dir that lives as long as this ModelDir.
        """
        try:
            return os.fsencode(p).decode("utf-8")
        except UnicodeDecodeError:
            pass
        if "_link" not in self.__dict__:
            tmp = tempfile.mkdtemp(prefix="healer-path-")
            link = Path(tmp) / "model"
            link.symlink_to(self.path.resolve())
            weakref.finalize(self, shutil.rmtree, tmp, True)
            self.__dict__["_link"] = link
        return str(self.__dict__["_link"] / p.resolve().relative_to(self.path.resolve()))

    def file(self, name: str) -> Path | None:
        p = self.path / name
        return p if p.is_file() else None

    def _json(self, name: str) -> Any:
        """A JSON file of the dir (None if absent); every one a checkpoint holds is an object."""
        p = self.file(name)
        if p is None:
            return None
        data = read_json(p)
        if not isinstance(data, dict):
            raise CheckpointError(f"{p}: expected a JSON object, got a {type(data).__name__}")
        return data

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
            try:
                return p.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise CheckpointError(f"{p}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            except OSError as e:
                raise CheckpointError(f"{p}: cannot read ({e.strerror or e})") from None
        ct = self._json("chat_template.json")
        if ct and ct.get("chat_template"):
            return _template_text(ct["chat_template"], self.path / "chat_template.json")
        tpl = self.tokenizer_config.get("chat_template")
        if isinstance(tpl, list):
            named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
            tpl = named.get("default") or next(iter(named.values()), None)
        return _template_text(tpl, self.path / "tokenizer_config.json") or None

    @property
    def chat_template_file(self) -> str | None:
        """Which file the default chat template comes from (for messages about it)."""
        if self.file("chat_template.jinja") is not None:
            return "chat_template.jinja"
        ct = self._json("chat_template.json")
        if ct and ct.get("chat_template"):
            return "chat_template.json"
        return "tokenizer_config.json" if self.tokenizer_config.get("chat_template") else None

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
            return Tokenizer.from_file(self._native(p))
        except Exception as e:
            raise CheckpointError(f"{p}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e

    def hf_tokenizer(self):
        """The tokenizer `transformers.AutoTokenizer` gives a user for this directory (loaded once)."""
        if "_hf_tokenizer" not in self.__dict__:
            self.__dict__["_hf_tokenizer"] = self._load_hf_tokenizer()
        return self.__dict__["_hf_tokenizer"]

    def _load_hf_tokenizer(self):
        import transformers

        # clear errors for broken JSON before transformers' tracebacks (the cached parses: parsing a 262K-token
        # tokenizer.json again costs a noticeable part of doctor's time: bench/results/doctor-real-vocab-2cpu.txt)
        _ = self.tokenizer_config, self.special_tokens_map, self.added_tokens_json, self.tokenizer_json
        _ = self.chat_template  # and for a template file that is not text (transformers reads it too)
        tj = self.tokenizer_json
        if tj is not None and not (isinstance(tj.get("model"), dict) and isinstance(tj.get("added_tokens", []), list)
                                   and "added_tokens" in tj):
            raise CheckpointError(f"{self.path / 'tokenizer.json'}: needs a \"model\" object and an \"added_tokens\" "
                                  "list (empty if there are none); transformers cannot load it without them")
        if self.has_sentencepiece:
            self.sentencepiece()
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            return transformers.AutoTokenizer.from_pretrained(self._native(self.path), local_files_only=True)
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
            with safe_open(self._native(path), framework="pt") as f:
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

    def check_head_tensors(self) -> None:
        """CheckpointError unless the embedding and lm_head are 2-D float tensors [rows, hidden_size]."""
        hidden = self.config.get("hidden_size")
        for name in (self.embed_name, self.lm_head_name):
            if name is None:
                continue
            shape = self.tensor_shape(name)
            path = self._locate(name)
            dtype = self._header(path)[name]["dtype"] if path.suffix == ".safetensors" else None
            if dtype is not None and dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"{path}: tensor {name} is stored as {dtype}; an embedding or output head "
                                      "holds floating point weights (F32, F16 or BF16)")
            if len(shape) != 2 or (isinstance(hidden, int) and shape[1] != hidden):
                hint = " (transposed?)" if len(shape) == 2 and shape[0] == hidden else ""
                raise CheckpointError(f"{path}: tensor {name} has shape {list(shape)}, expected [rows, hidden_size "
                                      f"{hidden}]{hint}")

    @property
    def tie_word_embeddings(self) -> bool:
        # transformers' default is True for most decoder configs when the key is absent
        return bool(self.config.get("tie_word_embeddings", self.model_type in ("gemma", "gemma2", "gemma3_text")))


def _template_text(value: Any, source: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value
    raise CheckpointError(f"{source}: chat_template must be a string (or a list of named templates), "
                          f"got {type(value).__name__}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_adapter_config(cfg: Any, path: Path) -> None:
    """CheckpointError naming `path` (an adapter_config.json) and the key, unless the LoRA settings make sense:
    r a positive integer, lora_alpha a finite number, rank_pattern/alpha_pattern maps of valid regexes."""
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got a {type(cfg).__name__}")
    r = cfg.get("r", 8)
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{path}: r (the LoRA rank) must be a positive integer, got {r!r}")
    if not _number(cfg.get("lora_alpha", 8)):
        raise CheckpointError(f"{path}: lora_alpha must be a finite number, got {cfg.get('lora_alpha')!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(key) or {}
        if not isinstance(patterns, dict):
            raise CheckpointError(f"{path}: {key} must map module name patterns to numbers, got {patterns!r}")
        for pattern, value in patterns.items():
            try:
                re.compile(pattern)
            except re.error as e:
                raise CheckpointError(f"{path}: {key} key {pattern!r} is not a valid regex ({e})") from None
            if not _number(value) or (key == "rank_pattern" and (not isinstance(value, int) or value < 1)):
                raise CheckpointError(f"{path}: {key}[{pattern!r}] must be a positive number, got {value!r}")
