"""Every claim the tokenizer files make about which token has which id.

A checkpoint can state a token's id in up to five places: the sentencepiece model, the
vocabulary and `added_tokens` of tokenizer.json, `added_tokens_decoder` in
tokenizer_config.json, and added_tokens.json. Loaders trust different ones, so a
disagreement means the same text encodes differently depending on who loads it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from healer.model_dir import ModelDir


@dataclass(frozen=True)
class Claim:
    source: str  # file (and part) that states it
    id: int
    content: str
    added: bool  # from an added-tokens list rather than the base vocabulary


class BaseVocab:
    """One base vocabulary as its file holds it: content -> id (BPE, WordPiece) or contents in id order.

    Kept as the file's own dict or list: one Claim object per entry of a 262K vocabulary cost
    seconds of doctor's time on Gemma 3's (bench/results/doctor-real-vocab-2cpu.txt), and only added tokens
    and ids that disagree are ever looked at one by one.
    """

    def __init__(self, source: str, vocab: dict[str, int] | list[str]):
        self.source = source
        self.vocab = vocab

    def __len__(self) -> int:
        return len(self.vocab)

    def pairs(self) -> Iterator[tuple[int, str]]:
        """(id, content) in file order."""
        if isinstance(self.vocab, dict):
            return ((i, c) for c, i in self.vocab.items())
        return enumerate(self.vocab)

    @property
    def max_id(self) -> int:
        if isinstance(self.vocab, dict):
            return max(self.vocab.values(), default=-1)
        return len(self.vocab) - 1

    @cached_property
    def _inverse(self) -> tuple[dict, dict]:
        """(single, multi): a dict vocab by id, a list vocab by content; multi holds what one value cannot."""
        by_id = isinstance(self.vocab, dict)
        single = {i: c for i, c in self.pairs()} if by_id else {c: i for i, c in self.pairs()}
        multi: dict = {}
        if len(single) < len(self.vocab):  # an id given twice (dict) or a content listed twice (list)
            for i, c in self.pairs():
                key, value = (i, c) if by_id else (c, i)
                multi.setdefault(key, set()).add(value)
            multi = {k: v for k, v in multi.items() if len(v) > 1}
        return single, multi

    def contents_at(self, id_: int) -> set[str]:
        if isinstance(self.vocab, list):
            return {self.vocab[id_]} if 0 <= id_ < len(self.vocab) else set()
        single, multi = self._inverse
        return set(multi.get(id_) or ({single[id_]} if id_ in single else ()))

    def ids_of(self, content: str) -> set[int]:
        if isinstance(self.vocab, dict):
            return {self.vocab[content]} if content in self.vocab else set()
        single, multi = self._inverse
        return set(multi.get(content) or ({single[content]} if content in single else ()))

    def has(self, id_: int, content: str) -> bool:
        if isinstance(self.vocab, dict):
            return self.vocab.get(content) == id_
        return 0 <= id_ < len(self.vocab) and self.vocab[id_] == content

    def ids_with_two_contents(self) -> set[int]:
        return set(self._inverse[1]) if isinstance(self.vocab, dict) else set()

    def ids_unlike(self, other: BaseVocab) -> set[int]:
        """Ids that both vocabularies hold, with different contents."""
        if isinstance(other.vocab, list):
            theirs = other.vocab
            return {i for i, c in self.pairs() if 0 <= i < len(theirs) and theirs[i] != c}
        theirs = other._inverse[0]
        return {i for i, c in self.pairs() if i in theirs and theirs[i] != c}


class Inventory:
    """All id<->content claims of a checkpoint's tokenizer files."""

    def __init__(self, base: list[BaseVocab], added: list[Claim]):
        self.base = [b for b in base if len(b)]
        self.added = added
        # indexes of the added claims (a few hundred; Gemma 3 has 6,415)
        self._added_ids: dict[str, set[int]] = defaultdict(set)
        self._added_contents: dict[int, set[str]] = defaultdict(set)
        self._added_sources: dict[tuple[int, str], set[str]] = defaultdict(set)
        for c in added:
            self._added_ids[c.content].add(c.id)
            self._added_contents[c.id].add(c.content)
            self._added_sources[(c.id, c.content)].add(c.source)

    @cached_property
    def claims(self) -> list[Claim]:
        """Every claim, base vocabularies first, in file order (materialized on first use)."""
        base = [Claim(b.source, i, c, False) for b in self.base for i, c in b.pairs()]
        return base + self.added

    @property
    def max_id(self) -> int:
        return max([b.max_id for b in self.base] + [c.id for c in self.added], default=-1)

    def contents_at(self, id_: int) -> set[str]:
        out = set(self._added_contents.get(id_, ()))
        for b in self.base:
            out |= b.contents_at(id_)
        return out

    def collisions(self) -> dict[int, set[str]]:
        """Ids that the files give more than one content: id -> the contents."""
        suspects = set(self._added_contents)
        for k, b in enumerate(self.base):
            suspects |= b.ids_with_two_contents()
            for other in self.base[k + 1:]:
                suspects |= b.ids_unlike(other)
        return {i: contents for i in suspects if len(contents := self.contents_at(i)) > 1}

    def ids_of(self, content: str) -> set[int]:
        out = set(self._added_ids.get(content, ()))
        for b in self.base:
            out |= b.ids_of(content)
        return out

    def sources_of(self, id_: int, content: str) -> list[str]:
        found = self._added_sources.get((id_, content), set()) | {b.source for b in self.base if b.has(id_, content)}
        return sorted(found)

    def ids_from(self, first: int) -> dict[int, str]:
        """Ids >= `first`, each with the content its first claim (in file order) gives it."""
        out: dict[int, str] = {}
        for b in self.base:
            if b.max_id >= first:
                for i, c in b.pairs():
                    if i >= first:
                        out.setdefault(i, c)
        for c in self.added:
            if c.id >= first:
                out.setdefault(c.id, c.content)
        return out

    def added_claims(self) -> list[Claim]:
        return list(self.added)

    def sources(self) -> set[str]:
        return {b.source for b in self.base} | {c.source for c in self.added}


def inventory(ckpt: ModelDir) -> Inventory:
    """Collect the claims of every tokenizer file present (built once per ModelDir; read-only)."""
    if "_inventory" not in ckpt.__dict__:
        ckpt.__dict__["_inventory"] = _collect(ckpt)
    return ckpt.__dict__["_inventory"]


def _collect(ckpt: ModelDir) -> Inventory:
    base: list[BaseVocab] = []
    added: list[Claim] = []
    if ckpt.has_sentencepiece:
        sp = ckpt.sentencepiece()
        base.append(BaseVocab("tokenizer.model", [sp.id_to_piece(i) for i in range(sp.get_piece_size())]))
    tj = ckpt.tokenizer_json
    if tj:
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            if not all(type(i) is int for i in vocab.values()):
                vocab = {content: int(i) for content, i in vocab.items()}
            base.append(BaseVocab("tokenizer.json vocab", vocab))
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            base.append(BaseVocab("tokenizer.json vocab", [entry[0] for entry in vocab]))
        for tok in tj.get("added_tokens") or []:
            added.append(Claim("tokenizer.json added_tokens", int(tok["id"]), tok["content"], True))
    decoder = ckpt.tokenizer_config.get("added_tokens_decoder") or {}
    for i, tok in decoder.items():
        content = tok.get("content") if isinstance(tok, dict) else tok
        added.append(Claim("tokenizer_config.json added_tokens_decoder", int(i), content, True))
    for content, i in ckpt.added_tokens_json.items():
        added.append(Claim("added_tokens.json", int(i), content, True))
    return Inventory(base, added)


def special_tokens(ckpt: ModelDir) -> dict[str, str]:
    """Declared special tokens: {'bos': '<s>', 'eos': '</s>', ...} plus additional specials by content."""
    out = {name: t for name in ("bos", "eos", "pad", "unk") if (t := ckpt.special_token(name))}
    extra = ckpt.tokenizer_config.get("additional_special_tokens") or ckpt.special_tokens_map.get(
        "additional_special_tokens") or []
    for t in extra:
        t = t.get("content") if isinstance(t, dict) else t
        if t:
            out[f"additional:{t}"] = t
    return out
