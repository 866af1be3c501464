"""Every claim the tokenizer files make about which token has which id.

A checkpoint can state a token's id in up to five places: the sentencepiece model, the
vocabulary and `added_tokens` of tokenizer.json, `added_tokens_decoder` in
tokenizer_config.json, and added_tokens.json. Loaders trust different ones, so a
disagreement means the same text encodes differently depending on who loads it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from healer.checkpoint import Checkpoint


@dataclass(frozen=True)
class Claim:
    source: str  # file (and part) that states it
    id: int
    content: str
    added: bool  # from an added-tokens list rather than the base vocabulary


@dataclass
class Inventory:
    """All id<->content claims of a checkpoint's tokenizer files."""

    claims: list[Claim] = field(default_factory=list)
    # indexes: a 128K vocabulary is looked up once per added token
    _ids: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set), repr=False)
    _sources: dict[tuple[int, str], set[str]] = field(default_factory=lambda: defaultdict(set), repr=False)

    def add(self, source: str, id_: int, content: str, added: bool) -> None:
        self.claims.append(Claim(source, int(id_), content, added))
        self._ids[content].add(int(id_))
        self._sources[(int(id_), content)].add(source)

    @property
    def max_id(self) -> int:
        return max((c.id for c in self.claims), default=-1)

    def by_id(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = defaultdict(set)
        for c in self.claims:
            out[c.id].add(c.content)
        return out

    def ids_of(self, content: str) -> set[int]:
        return set(self._ids.get(content, ()))

    def sources_of(self, id_: int, content: str) -> list[str]:
        return sorted(self._sources.get((id_, content), ()))

    def added_claims(self) -> list[Claim]:
        return [c for c in self.claims if c.added]

    def sources(self) -> set[str]:
        return {c.source for c in self.claims}


def inventory(ckpt: Checkpoint) -> Inventory:
    """Collect the claims of every tokenizer file present (built once per Checkpoint; read-only)."""
    if "_inventory" not in ckpt.__dict__:
        ckpt.__dict__["_inventory"] = _collect(ckpt)
    return ckpt.__dict__["_inventory"]


def _collect(ckpt: Checkpoint) -> Inventory:
    inv = Inventory()
    if ckpt.has_sentencepiece:
        sp = ckpt.sentencepiece()
        for i in range(sp.get_piece_size()):
            inv.add("tokenizer.model", i, sp.id_to_piece(i), added=False)
    tj = ckpt.tokenizer_json
    if tj:
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict):
            for content, i in vocab.items():
                inv.add("tokenizer.json vocab", i, content, added=False)
        elif isinstance(vocab, list):  # Unigram: [[piece, score], ...] in id order
            for i, entry in enumerate(vocab):
                inv.add("tokenizer.json vocab", i, entry[0], added=False)
        for tok in tj.get("added_tokens") or []:
            inv.add("tokenizer.json added_tokens", tok["id"], tok["content"], added=True)
    decoder = ckpt.tokenizer_config.get("added_tokens_decoder") or {}
    for i, tok in decoder.items():
        content = tok.get("content") if isinstance(tok, dict) else tok
        inv.add("tokenizer_config.json added_tokens_decoder", int(i), content, added=True)
    for content, i in ckpt.added_tokens_json.items():
        inv.add("added_tokens.json", i, content, added=True)
    return inv


def special_tokens(ckpt: Checkpoint) -> dict[str, str]:
    """Declared special tokens: {'bos': '<s>', 'eos': '</s>', ...} plus additional specials by content."""
    out = {name: t for name in ("bos", "eos", "pad", "unk") if (t := ckpt.special_token(name))}
    extra = ckpt.tokenizer_config.get("additional_special_tokens") or ckpt.special_tokens_map.get(
        "additional_special_tokens") or []
    for t in extra:
        t = t.get("content") if isinstance(t, dict) else t
        if t:
            out[f"additional:{t}"] = t
    return out
