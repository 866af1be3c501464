"""Tokenizer metadata for GGUF, following llama.cpp's convert_hf_to_gguf.py.

- tokenizer.model (sentencepiece) -> `llama` vocab: pieces, scores and types from the
  protobuf; added tokens (added_tokens.json, tokenizer_config's added_tokens_decoder,
  tokenizer.json's added_tokens) override their ids with score -1000 and type CONTROL
  (special) or USER_DEFINED, as the converter does.
- tokenizer.json with a byte-level BPE -> `gpt2` vocab: tokens by id, merges, and the
  pre-tokenizer name llama.cpp knows it by (see `pre_tokenizer_name`).
Special ids and the add_bos/add_eos flags come from what the transformers tokenizer does,
not from config files, so the GGUF tokenizes the way the model was trained.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from export.bpe_pre_tokenizers import CHECK_TEXT, PRE_TOKENIZERS
from export.errors import TokenizationWarning, UnsupportedError
from healer.errors import CheckpointError
from healer.model_dir import ModelDir, read_json

TT = gguf.TokenType
# tokens llama.cpp treats as end of turn; the first one present becomes tokenizer.ggml.eot_token_id
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>")


@dataclass
class Vocab:
    """Everything `tokenizer.ggml.*` holds for one tokenizer."""

    model: str
    pre: str
    tokens: list[bytes]
    types: list[int]
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special: dict[str, int] = field(default_factory=dict)
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | list | None = None

    def write(self, w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model(self.model)
        w.add_tokenizer_pre(self.pre)
        w.add_token_list(self.tokens)
        w.add_token_types(self.types)
        if self.scores is not None:
            w.add_token_scores(self.scores)
        if self.merges:
            w.add_token_merges(self.merges)
        writers = {"bos": w.add_bos_token_id, "eos": w.add_eos_token_id, "unk": w.add_unk_token_id,
                   "pad": w.add_pad_token_id, "eot": w.add_eot_token_id}
        for kind, tid in self.special.items():
            writers[kind](tid)
        w.add_add_bos_token(self.add_bos)
        w.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            w.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            w.add_chat_template(self.chat_template)


def _looks_special(text: str) -> bool:
    # convert_hf_to_gguf's does_token_look_special: added tokens some models forget to mark special
    return (text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (text.startswith("<|") and text.endswith("|>"))
            or (text.startswith("<｜") and text.endswith("｜>"))
            or (text.startswith("<unused") and text.endswith(">")))


def _read(directory: Path, name: str) -> Any:
    p = directory / name
    return read_json(p) if p.is_file() else None


def _added_tokens(directory: Path) -> dict[int, tuple[str, bool]]:
    """id -> (content, special) from every place a HF dir declares added tokens."""
    found: dict[int, tuple[str, bool]] = {}
    for content, tid in (_read(directory, "added_tokens.json") or {}).items():
        found[int(tid)] = (content, False)
    for t in (_read(directory, "tokenizer.json") or {}).get("added_tokens", []):
        found[int(t["id"])] = (t["content"], bool(t.get("special")))
    for tid, t in ((_read(directory, "tokenizer_config.json") or {}).get("added_tokens_decoder") or {}).items():
        found[int(tid)] = (t["content"], bool(t.get("special")))
    return found


def hf_tokenizer(directory: Path):
    """The transformers tokenizer of `directory` (which may be an adapter dir without config.json)."""
    if (directory / "config.json").is_file():
        return ModelDir(directory).hf_tokenizer()
    import transformers

    try:
        return transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{directory}: transformers cannot load the tokenizer ({msg})") from e


def _sentencepiece_vocab(directory: Path, vocab_size: int) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = directory / "tokenizer.model"
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:
        raise CheckpointError(f"{path}: not a valid sentencepiece model ({e})") from e
    if len(proto.pieces) > vocab_size:
        raise CheckpointError(f"{path} has {len(proto.pieces)} pieces but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [int(TT.UNUSED)] * vocab_size
    for i, p in enumerate(proto.pieces):
        # GGUF token types use sentencepiece's numbering (NORMAL=1 ... BYTE=6)
        tokens[i], scores[i], types[i] = p.piece.encode("utf-8"), p.score, int(p.type)
    for tid, (content, special) in sorted(_added_tokens(directory).items()):
        if tid >= vocab_size:
            raise CheckpointError(f"{directory}: added token {content!r} has id {tid}, "
                                  f"beyond the model's vocab_size {vocab_size}")
        if special or _looks_special(content):
            types[tid] = int(TT.CONTROL)
        else:
            content = content.replace("\u2581", " ")  # llama.cpp expects user-defined tokens pre-normalized
            types[tid] = int(TT.USER_DEFINED)
        tokens[tid], scores[tid] = content.encode("utf-8"), -1000.0
    return Vocab("llama", "default", tokens, types, scores,
                 add_space_prefix=proto.normalizer_spec.add_dummy_prefix)


def _warn_on_text_after_specials(tok, directory: Path) -> None:
    """Warn when the tokenizer does not prefix text after a special token the way llama.cpp will.

    llama.cpp prefixes "▁" to every piece of text that follows a special token in a sentencepiece
    vocabulary (there is no GGUF flag to limit it to the start of the text), so it encodes
    `s + "user"` as [s] + encode("user"). transformers' non-legacy tokenizers prefix only the start.
    """
    plain = tok.encode("user", add_special_tokens=False)
    for content, tid in _special_probes(tok):
        train = tok.encode(content + "user", add_special_tokens=False)
        if train != [tid] + plain:
            warnings.warn(
                f"{directory}: llama.cpp will tokenize text after special tokens differently from training: "
                f"{content + 'user'!r} is {train} with this tokenizer and {[tid] + plain} in llama.cpp, which "
                "prefixes '▁' to text after every special token; for ChatML, `healer fix --chatml` on the base "
                "model builds a tokenizer that follows llama.cpp's rule", TokenizationWarning, stacklevel=3)
            return


def _special_probes(tok, limit: int = 8) -> list[tuple[str, int]]:
    """Special added tokens that match as a whole (no space stripping), end-of-turn ones first."""
    found = [(t.content, i) for i, t in sorted(tok.added_tokens_decoder.items())
             if t.special and not (t.lstrip or t.rstrip or t.single_word) and t.content != tok.bos_token]
    found.sort(key=lambda ct: ct[0] not in EOT_TOKENS)
    return found[:limit]


def _merges(tokenizer_json: dict) -> list[str]:
    merges = tokenizer_json.get("model", {}).get("merges") or []
    if merges and isinstance(merges[0], list):
        # transformers >= 4.45 stores pairs; GGUF keeps "a b" strings with spaces as U+0120 (as gguf.SpecialVocab)
        return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair)
                for pair in merges]
    return list(merges)


def pre_tokenizer_name(tok, bos_id: int | None) -> str:
    """llama.cpp's name for the BPE pre-tokenizer of `tok`.

    llama.cpp identifies it by sha256(str(ids)) of a fixed text encoded by the upstream
    tokenizer (convert_hf_to_gguf.py's get_vocab_base_pre) and so do we, on the same text and
    table. Because that table was built from upstream tokenizers, which may add a BOS that a
    local copy does not (or the other way round), we hash the ids with and without a leading
    BOS and take the BOS-prefixed match first: a pre-tokenizer does not depend on BOS.
    """
    ids = tok.encode(CHECK_TEXT, add_special_tokens=False)
    candidates = ([[bos_id, *ids]] if bos_id is not None else []) + [ids]
    hashes = [hashlib.sha256(str(c).encode()).hexdigest() for c in candidates]
    for h in hashes:
        if h in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[h]
    raise UnsupportedError(f"BPE pre-tokenizer not known to llama.cpp (hash {hashes[-1][:16]}...); "
                           "llama.cpp would tokenize this model wrongly")


def _bpe_vocab(directory: Path, tok, vocab_size: int) -> Vocab:
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise CheckpointError(f"{directory}: the tokenizer has ids up to {max(vocab.values())} "
                              f"but the model's vocab_size is {vocab_size}")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(TT.UNUSED))
            continue
        text = reverse[i]
        if i in added:
            if added[i].special or _looks_special(text):
                types.append(int(TT.CONTROL))
            else:
                text = text.replace("\u2581", " ")
                types.append(int(TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(text.encode("utf-8"))
    tokenizer_json = _read(directory, "tokenizer.json") or {}
    return Vocab("gpt2", pre_tokenizer_name(tok, tok.bos_token_id), tokens, types,
                 merges=_merges(tokenizer_json))


def _is_byte_level(tokenizer_json: dict) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(has(v) for v in node.values())
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tokenizer_json.get("pre_tokenizer")) or has(tokenizer_json.get("decoder"))


def _config_id(config: dict, kind: str) -> int | None:
    value = config.get(f"{kind}_token_id")
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def chat_template(directory: Path) -> str | list | None:
    """The chat template(s) as transformers finds them: chat_template.jinja/.json, then tokenizer_config."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    ct = _read(directory, "chat_template.json")
    if isinstance(ct, dict) and ct.get("chat_template"):
        return ct["chat_template"]
    return (_read(directory, "tokenizer_config.json") or {}).get("chat_template") or None


def build_vocab(directory: Path, config: dict) -> Vocab:
    """The GGUF tokenizer metadata for the tokenizer files in `directory`."""
    vocab_size = int(config["vocab_size"])
    tok = hf_tokenizer(directory)
    if (directory / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(directory, vocab_size)
        if vocab.add_space_prefix:
            _warn_on_text_after_specials(tok, directory)
    else:
        tokenizer_json = _read(directory, "tokenizer.json")
        if tokenizer_json is None:
            raise CheckpointError(f"{directory}: no tokenizer.model or tokenizer.json")
        model_type = tokenizer_json.get("model", {}).get("type")
        if model_type != "BPE" or not _is_byte_level(tokenizer_json):
            raise UnsupportedError(f"{directory}/tokenizer.json is a {model_type} tokenizer without byte-level "
                                   "pre-tokenization; GGUF export needs tokenizer.model for sentencepiece "
                                   "tokenizers (copy the base model's tokenizer.model beside it)")
        vocab = _bpe_vocab(directory, tok, vocab_size)
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tok, f"{kind}_token_id", None)
        tid = tid if isinstance(tid, int) else _config_id(config, kind)
        if tid is not None and 0 <= tid < vocab_size:
            vocab.special[kind] = tid
    texts = {t.decode("utf-8", "replace"): i for i, t in enumerate(vocab.tokens)}
    eot = next((texts[t] for t in EOT_TOKENS if t in texts), None)
    if eot is not None:
        vocab.special["eot"] = eot
    plain = tok.encode("a", add_special_tokens=False)
    full = tok.encode("a", add_special_tokens=True)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    vocab.add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    vocab.add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    vocab.chat_template = chat_template(directory)
    return vocab

