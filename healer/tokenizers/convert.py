"""Slow -> fast conversion of sentencepiece models, kept only when verified against sentencepiece.

`convert_verified` builds tokenizer.json candidates and keeps the first that encodes every
given string exactly as sentencepiece does and round-trips decoding the same way:

1. `transformers`: the straightforward conversion (transformers' own converter).
2. `spm`: a pipeline built from the model's own NormalizerSpec / TrainerSpec.
3. `spm+nfc`: the same with NFC ahead of the charsmap (see `spm_pipeline`).

Why transformers' conversion fails on whitespace (measured on Mistral and Llama 2): it puts the
dummy prefix in `Metaspace(prepend_scheme="first")`, which prepends "▁" only when the text does
not already start with "▁" after replacing spaces. sentencepiece's normalizer adds the dummy
prefix unconditionally, then escapes spaces: " " becomes "▁▁" (one piece, id 259 in Llama 2),
"  a" becomes "▁▁▁a"; the fast tokenizer sees "▁" and "▁▁a", one "▁" short.

How the `spm` pipeline reproduces sentencepiece, component by component:

- normalizer: `Precompiled(charsmap)` when the model has one (nmt_nfkc and friends); with
  remove_extra_whitespaces, leading spaces dropped, runs of spaces collapsed to one, trailing
  "▁" dropped after escaping (sentencepiece strips trailing U+2581, literal ones included);
  escape_whitespaces as `Replace(" ", "▁")`.
- dummy prefix: `Metaspace(replacement=" ", prepend_scheme="first")` then
  `Metaspace(replacement="▁", prepend_scheme="never")`. After escaping, the text holds no
  plain space, so the first Metaspace's "does it already start with the replacement" test is
  always false and it prepends a space to the first piece of text only (never after a special
  token: transformers' non-legacy behaviour, which the official Mistral templates rely on, e.g.
  "[INST] Hi" gives mistral-common's ids); the second turns that space into "▁". Empty text gets
  no prefix, as in sentencepiece. With `prefix_after_specials`, `prepend_scheme="always"`
  prefixes every piece of text between special tokens instead, which is what llama.cpp does
  with a sentencepiece GGUF vocabulary (see compare.py): `fix --chatml` asks for it, since
  the ChatML template puts text right after its tokens and only this rule lets a model trained
  with the tokenizer be served the same ids by llama.cpp. Verification then compares the text
  around special tokens too (`compare_around_specials`). Models whose dummy prefix has to sit in
  the normalizer (below) prefix every piece either way.
- BPE: sentencepiece merges the adjacent pair whose concatenation is a piece with the highest
  score, leftmost first. The merges list holds every split of every NORMAL piece into two
  pieces, ranked by the merged piece's score. CONTROL / UNKNOWN / BYTE pieces are never merge
  results (sentencepiece keeps them out of its merge table). byte_fallback and fused unknowns
  as in sentencepiece.
- user-defined pieces: sentencepiece matches them (longest first) in the normalized text and
  freezes them. Here a `Split` pre-tokenizer isolates them (alternatives longest first) and
  `ignore_merges=True` maps an isolated piece to its id. ignore_merges also maps any *other*
  whole word that is a vocabulary entry straight to its id, which sentencepiece would not do
  for CONTROL / UNKNOWN / BYTE pieces ("<s>", "<0x0A>") or for NORMAL pieces its merges cannot
  reach; such a word can only be a segment between user-defined pieces. A second `Split`
  isolates the first character of exactly those words, which gives sentencepiece's result
  whenever its merges do not join that first character (the probe strings check it).
- Unigram: `models.Unigram` with the model's scores. sentencepiece keeps CONTROL / UNKNOWN /
  BYTE pieces out of its lattice; tokenizers cannot, so their scores are set to the lowest
  NORMAL score (which keeps the unknown penalty, min score - 10, unchanged).
- decoder: unknown piece -> the model's unk_surface (" ⁇ "), "▁" -> " ", byte fallback,
  fuse, and one leading space stripped when the dummy prefix (or whitespace removal) is on.

Not expressible (the candidate reports it instead of being built): add_dummy_prefix with
treat_whitespace_as_suffix (the dummy goes at the end; no tokenizers component appends text),
add_dummy_prefix without escape_whitespaces (Metaspace's "starts with" test sees the spaces),
UNUSED pieces in a BPE model (sentencepiece merges then re-splits them), model types other
than BPE and Unigram. Not reproduced exactly, and left to verification to catch: two splits of
one piece share a priority in sentencepiece but get distinct ranks here; user-defined pieces are
not shielded from the charsmap; tokenizers' Precompiled drops a combining mark that follows a
character the charsmap rewrites ("\xa0" + U+1712 -> " ", sentencepiece keeps U+1712: measured 4
in 10,000 fuzz strings on a trained nmt_nfkc Unigram model); in a Unigram model, text spelling
a byte piece ("<0x0B>") whose characters are not all in the vocabulary is matched as that byte
piece; with remove_extra_whitespaces, sentencepiece's decoder strips one "▁" from each leading
piece until it has output text, the decoder here strips one space in all.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as pb
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from healer.errors import CheckpointError
from healer.tokenizers.compare import (
    Comparison,
    Mismatch,
    compare_around_specials,
    compare_encodings,
    special_context_strings,
)

Piece = pb.ModelProto.SentencePiece
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = (
    Piece.NORMAL, Piece.UNKNOWN, Piece.CONTROL, Piece.USER_DEFINED, Piece.UNUSED, Piece.BYTE,
)
SPACE = "\u2581"
UNREACHABLE_PENALTY = 1e6
CANDIDATES = ("transformers", "spm", "spm+nfc")


class Inexpressible(Exception):
    """The sentencepiece model uses a feature no tokenizers pipeline reproduces."""


@dataclass(frozen=True)
class Attempt:
    """One candidate: its comparison with sentencepiece, or why it could not be built."""

    name: str
    comparison: Comparison | None = None
    error: str | None = None


@dataclass(frozen=True)
class ConversionResult:
    """The verified tokenizer.json (or None when no candidate agreed) and how each candidate did."""

    tokenizer_json: str | None
    candidate: str | None
    comparison: Comparison | None
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.tokenizer_json is not None

    def first_disagreements(self, k: int = 5) -> list[Mismatch]:
        """The first encode disagreements of the closest candidate (for an unfixable report)."""
        built = [a.comparison for a in self.attempts if a.comparison is not None]
        if not built:
            return []
        best = min(built, key=lambda c: len(c.mismatches) + len(c.decode_mismatches))
        return best.mismatches[:k]


def load_model(model: str | Path | bytes) -> tuple[bytes, pb.ModelProto]:
    """Read a sentencepiece model (path or serialized bytes) into its ModelProto."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError and friends
        raise CheckpointError(f"tokenizer.model is not a sentencepiece model ({e}); restore the original file") from e
    if not proto.pieces:
        raise CheckpointError("tokenizer.model has no pieces; restore the original file")
    return data, proto


def convert_verified(
    model: str | Path | bytes,
    strings: Iterable[str],
    added_tokens: Mapping[int, AddedToken | str] | None = None,
    *,
    add_bos: bool = True,
    add_eos: bool = False,
    tokenizer_class: str = "LlamaTokenizer",
    probes: bool = True,
    candidates: Sequence[str] = CANDIDATES,
    prefix_after_specials: bool = False,
) -> ConversionResult:
    """Build tokenizer.json candidates; keep the first that agrees with sentencepiece on every string.

    `added_tokens` maps ids to tokens (as in transformers' added_tokens_decoder); ids past the
    sentencepiece vocabulary must follow it without gaps. CONTROL and UNKNOWN pieces are always
    added as special tokens. `probes` adds strings derived from the model (its special and
    user-defined piece texts, alone and in context) to `strings`. `candidates` picks and orders
    the candidates by name (a subset of CANDIDATES). `prefix_after_specials` builds and verifies
    the dummy prefix on every piece of text between special tokens (llama.cpp's rule).
    """
    data, proto = load_model(model)
    sp = spm.SentencePieceProcessor(model_proto=data)
    texts = list(strings)
    if probes:
        texts += probe_strings(proto)
    tokens = added_token_list(proto, added_tokens or {})
    specials = specials_to_verify(proto, tokens, added_tokens or {}) if prefix_after_specials else {}
    special_texts = special_context_strings(specials)
    builders = {
        "transformers": lambda: transformers_conversion(data, tokenizer_class),
        "spm": lambda: spm_pipeline(proto, every_piece=prefix_after_specials),
        "spm+nfc": lambda: spm_pipeline(proto, compose_first=True, every_piece=prefix_after_specials),
    }
    assert set(candidates) <= set(builders), candidates
    attempts: list[Attempt] = []
    for name in candidates:
        build = builders[name]
        try:
            tok = build()
        except Inexpressible as e:
            attempts.append(Attempt(name, error=str(e)))
            continue
        except Exception as e:  # a converter that crashes on this model is a failed candidate, not ours
            attempts.append(Attempt(name, error=f"{type(e).__name__}: {e}"))
            continue
        finish(tok, proto, tokens, add_bos, add_eos)
        text = tok.to_str()
        fast = Tokenizer.from_str(text)
        comparison = merged(compare_encodings(sp, fast, texts),
                            compare_around_specials(sp, fast, specials, special_texts))
        attempts.append(Attempt(name, comparison))
        if comparison.agrees:
            return ConversionResult(text, name, comparison, attempts)
    last = next((a.comparison for a in reversed(attempts) if a.comparison is not None), None)
    return ConversionResult(None, None, last, attempts)


def specials_to_verify(proto: pb.ModelProto, tokens: list[tuple[int, AddedToken]],
                       requested: Mapping[int, AddedToken | str], limit: int = 64) -> dict[str, int]:
    """Special tokens to check the text around (content -> id): every requested one and the
    first `limit` others. Tokens that strip neighbouring spaces (lstrip/rstrip) are left out:
    sentencepiece has no such rule to compare with."""
    plain = [(i, t) for i, t in tokens if t.special and not (t.lstrip or t.rstrip or t.single_word)]
    picked = [(i, t) for i, t in plain if i in requested] + [(i, t) for i, t in plain if i not in requested][:limit]
    return {t.content: i for i, t in picked}


def merged(a: Comparison, b: Comparison) -> Comparison:
    """One comparison over the strings of both."""
    return Comparison(a.n + b.n, a.mismatches + b.mismatches, a.decode_mismatches + b.decode_mismatches)


def added_token_list(proto: pb.ModelProto, extra: Mapping[int, AddedToken | str]) -> list[tuple[int, AddedToken]]:
    """(id, AddedToken) for every control/unknown piece and every caller token, in id order."""
    n = len(proto.pieces)
    out: dict[int, AddedToken] = {}
    for i, p in enumerate(proto.pieces):
        if p.type in (CONTROL, UNKNOWN):
            out[i] = AddedToken(p.piece, special=True, normalized=False)
    for i, tok in sorted(extra.items()):
        t = AddedToken(tok, special=True, normalized=False) if isinstance(tok, str) else tok
        if i < n:
            piece = proto.pieces[i]
            if piece.piece != t.content:
                raise CheckpointError(
                    f"added token id {i} is {t.content!r} but tokenizer.model has {piece.piece!r} there; "
                    "make tokenizer_config.json and tokenizer.model agree"
                )
            # A non-special added token that is a plain or user-defined piece would be cut out of
            # the text before the model sees it; sentencepiece tokenizes it in context, so leave
            # it to the model.
            if piece.type in (NORMAL, USER_DEFINED) and not t.special:
                continue
            if piece.type in (CONTROL, UNKNOWN):
                t = AddedToken(t.content, special=True, normalized=False, lstrip=t.lstrip, rstrip=t.rstrip,
                               single_word=t.single_word)
        out[i] = t
    beyond = sorted(i for i in out if i >= n)
    if beyond != list(range(n, n + len(beyond))):
        raise CheckpointError(
            f"added token ids past the {n} sentencepiece pieces must be {n}, {n + 1}, ... without gaps; "
            f"got {beyond[:8]}"
        )
    return sorted(out.items())


def finish(tok: Tokenizer, proto: pb.ModelProto, tokens: list[tuple[int, AddedToken]], add_bos: bool,
           add_eos: bool) -> None:
    """Install the added tokens and the BOS/EOS post-processor on a candidate."""
    # one call per run of same-kind tokens: each call rebuilds the added-token matcher, and new ids
    # are handed out in call order
    for special, run in itertools.groupby(tokens, key=lambda it: it[1].special):
        batch = [t for _, t in run]
        if special:
            tok.add_special_tokens(batch)
        else:
            tok.add_tokens(batch)
    for i, t in tokens:
        if tok.token_to_id(t.content) != i:
            raise CheckpointError(
                f"added token {t.content!r} should be id {i} but the vocabulary already has it as "
                f"{tok.token_to_id(t.content)}; remove the duplicate from tokenizer_config.json"
            )
    tok.post_processor = post_processor(proto, add_bos, add_eos)


def post_processor(proto: pb.ModelProto, add_bos: bool, add_eos: bool) -> processors.TemplateProcessing:
    """TemplateProcessing adding BOS / EOS as the flags say (LlamaTokenizerFast's layout)."""
    ts = proto.trainer_spec
    specials = []
    bos = eos = None
    if add_bos and 0 <= ts.bos_id < len(proto.pieces):
        bos = proto.pieces[ts.bos_id].piece
        specials.append((bos, ts.bos_id))
    if add_eos and 0 <= ts.eos_id < len(proto.pieces):
        eos = proto.pieces[ts.eos_id].piece
        specials.append((eos, ts.eos_id))

    def side(seq: str, type_id: int) -> str:
        parts = ([f"{bos}:{type_id}"] if bos else []) + [f"${seq}:{type_id}"] + ([f"{eos}:{type_id}"] if eos else [])
        return " ".join(parts)

    return processors.TemplateProcessing(
        single=side("A", 0), pair=side("A", 0) + " " + side("B", 1), special_tokens=specials
    )


def transformers_conversion(data: bytes, tokenizer_class: str) -> Tokenizer:
    """Candidate 1: what transformers builds from tokenizer.model alone."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(data)
        (Path(tmp) / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
        hf = AutoTokenizer.from_pretrained(tmp)
    backend = getattr(hf, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise Inexpressible(f"transformers returned {type(hf).__name__} without a fast backend")
    return Tokenizer.from_str(backend.to_str())


def spm_pipeline(proto: pb.ModelProto, compose_first: bool = False, every_piece: bool = False) -> Tokenizer:
    """Candidates 2 and 3: a tokenizers pipeline reproducing the model's own normalizer and trainer specs.

    `compose_first` puts NFC before the charsmap (candidate 3, only for models with one).
    tokenizers' Precompiled looks a whole grapheme up, and when only a prefix of it is in the
    charsmap it replaces the whole grapheme by that prefix's mapping: NFD "e\u0302\u0301"
    becomes "ê" where sentencepiece's longest-prefix rewriting gives "ế". Composing first
    hands Precompiled the precomposed character. `every_piece` puts the dummy prefix on every piece
    of text between special tokens, not only the first (see the module docstring).
    """
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    if ts.model_type == pb.TrainerSpec.BPE:
        if any(p.type == UNUSED for p in proto.pieces):
            raise Inexpressible("UNUSED pieces in a BPE model: sentencepiece merges and then re-splits them")
        merges = merges_by_score(proto)
        model = bpe_model(proto, merges, ignore_merges=bool(user_defined))
    elif ts.model_type == pb.TrainerSpec.UNIGRAM:
        model = unigram_model(proto)
    else:
        raise Inexpressible(f"model type {pb.TrainerSpec.ModelType.Name(ts.model_type)} is not BPE or Unigram")
    tok = Tokenizer(model)
    norm = normalizer_steps(ns)
    if compose_first:
        if not ns.precompiled_charsmap:
            raise Inexpressible("no charsmap: composing first is the same pipeline as 'spm'")
        norm.insert(1 if prepends_in_normalizer(ns) else 0, normalizers.NFC())
    if norm:
        tok.normalizer = normalizers.Sequence(norm)
    pre = pre_tokenizer_steps(proto, user_defined, merges if ts.model_type == pb.TrainerSpec.BPE else [],
                              every_piece)
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    tok.decoder = decoder(proto)
    return tok


def prepends_in_normalizer(ns: pb.NormalizerSpec) -> bool:
    """Whether the dummy prefix is added by the normalizer instead of the pre-tokenizer.

    With a charsmap or whitespace removal, sentencepiece adds the dummy before them and lets
    them collapse it with leading spaces; a `Prepend(" ")` normalizer at the same place does the
    same (normalizers run on each piece of text between special tokens, like the pre-tokenizer).
    """
    return ns.add_dummy_prefix and bool(ns.precompiled_charsmap or ns.remove_extra_whitespaces)


def normalizer_steps(ns: pb.NormalizerSpec) -> list[normalizers.Normalizer]:
    steps: list[normalizers.Normalizer] = []
    prepend = prepends_in_normalizer(ns)
    if prepend:
        # A space that leading spaces collapse into: it becomes the dummy "▁", as in sentencepiece,
        # which strips leading spaces and then adds the dummy.
        steps.append(normalizers.Prepend(" "))
    if ns.precompiled_charsmap:
        steps.append(normalizers.Precompiled(ns.precompiled_charsmap))
    if ns.remove_extra_whitespaces:
        # sentencepiece tests the *normalized* text for " ", so these run after the charsmap;
        # the trailing strip covers literal U+2581 too, since sentencepiece strips after escaping
        if not prepend:
            steps.append(normalizers.Replace(Regex(r"\A +"), ""))
        trailing = "[ \u2581]" if ns.escape_whitespaces else " "
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(trailing + r"+\z"), "")]
    if ns.escape_whitespaces:
        steps.append(normalizers.Replace(" ", SPACE))
    return steps


def pre_tokenizer_steps(
    proto: pb.ModelProto, user_defined: list[str], merges: list[tuple[str, str]], every_piece: bool = False
) -> list[pre_tokenizers.PreTokenizer]:
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    steps: list[pre_tokenizers.PreTokenizer] = []
    if ns.add_dummy_prefix:
        if ts.treat_whitespace_as_suffix:
            raise Inexpressible("treat_whitespace_as_suffix puts the dummy '▁' at the end; nothing appends text")
        if not ns.escape_whitespaces:
            raise Inexpressible("add_dummy_prefix without escape_whitespaces: Metaspace skips text starting with ' '")
    if ns.add_dummy_prefix and not prepends_in_normalizer(ns):
        steps += [
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="always" if every_piece else "first",
                                     split=False),
            pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never", split=False),
        ]
    if user_defined:
        longest_first = sorted(user_defined, key=lambda s: (-len(s), s))
        steps.append(pre_tokenizers.Split(Regex("|".join(map(regex_literal, longest_first))), "isolated"))
        if ts.model_type == pb.TrainerSpec.BPE:
            guard, times = collision_guard(proto, merges)
            if guard:
                steps += [pre_tokenizers.Split(Regex(guard), "isolated")] * times
    return steps


def regex_literal(s: str) -> str:
    """`s` as an Oniguruma pattern matching it literally."""
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{{{ord(c):x}}}" for c in s)


def collision_guard(proto: pb.ModelProto, merges: list[tuple[str, str]]) -> tuple[str | None, int]:
    """A pattern isolating the first token of a word that ignore_merges would wrongly take whole,
    and how many times to apply it.

    Those words are the vocabulary entries sentencepiece's BPE never produces from text: CONTROL,
    UNKNOWN and BYTE pieces, and NORMAL pieces its merges cannot reach. BPE is compositional at
    the boundaries of its result (no merge ever crossed them), so cutting a word after its first
    final token leaves the rest to tokenize alone; when the rest is itself such a word, the next
    application cuts it again.
    """
    reference = Tokenizer(bpe_model(proto, merges, ignore_merges=False))
    candidates = [(i, p) for i, p in enumerate(proto.pieces) if p.type != USER_DEFINED and len(p.piece) > 1]
    encodings = reference.encode_batch([p.piece for _, p in candidates], add_special_tokens=False)
    cut: dict[str, tuple[str, str]] = {}
    for (i, p), enc in zip(candidates, encodings):
        if p.type == NORMAL and enc.ids == [i]:
            continue
        head = p.piece[: enc.offsets[0][1]]  # character offsets: byte-fallback tokens cover their whole char
        cut[p.piece] = (head, p.piece[len(head):])
    if not cut:
        return None, 0

    def depth(word: str) -> int:
        n = 0
        while word in cut and cut[word][1]:
            n, word = n + 1, cut[word][1]
        return n

    by_head: dict[str, list[str]] = {}
    for head, rest in cut.values():
        by_head.setdefault(head, []).append(rest)
    alternatives = [
        regex_literal(head) + "(?=(?:" + "|".join(map(regex_literal, sorted(rests, key=lambda r: (-len(r), r))))
        + r")\z)"
        for head, rests in sorted(by_head.items(), key=lambda kv: (-len(kv[0]), kv[0]))
    ]
    return r"\A(?:" + "|".join(alternatives) + ")", max(map(depth, cut))


def merges_by_score(proto: pb.ModelProto) -> list[tuple[str, str]]:
    """Every split of every NORMAL piece into two NORMAL pieces, highest merged score first."""
    normal = {p.piece: (i, p.score) for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    ranked = []
    for piece, (i, score) in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def bpe_model(proto: pb.ModelProto, merges: list[tuple[str, str]], ignore_merges: bool) -> models.BPE:
    """BPE over every piece of the model with the given merges."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), None)
    return models.BPE(
        vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback,
        ignore_merges=ignore_merges,
    )


def unigram_model(proto: pb.ModelProto) -> models.Unigram:
    """Unigram over the model's scores, with pieces sentencepiece keeps out of its lattice priced out.

    The unknown penalty moves with them (tokenizers takes min score - 10 over every piece), but
    an unknown node only covers a character no piece contains, which every path must cover the
    same way, so the best path does not change.
    """
    scores = [p.score for p in proto.pieces if p.type == NORMAL]
    unreachable = (min(scores) if scores else 0.0) - UNREACHABLE_PENALTY
    vocab = [(p.piece, p.score if p.type in (NORMAL, USER_DEFINED) else unreachable) for p in proto.pieces]
    unk = next((i for i, p in enumerate(proto.pieces) if p.type == UNKNOWN), None)
    return models.Unigram(vocab, unk_id=unk, byte_fallback=proto.trainer_spec.byte_fallback)


def decoder(proto: pb.ModelProto) -> decoders.Decoder:
    ts, ns = proto.trainer_spec, proto.normalizer_spec
    steps: list[decoders.Decoder] = []
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), None)
    if unk is not None:
        steps.append(decoders.Replace(unk, ts.unk_surface))
    if ns.escape_whitespaces:
        steps.append(decoders.Replace(SPACE, " "))
    if ts.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())
    if ns.add_dummy_prefix or ns.remove_extra_whitespaces:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def probe_strings(proto: pb.ModelProto) -> list[str]:
    """Strings aimed at this model's special and user-defined pieces, alone and in context."""
    specials = [p.piece for p in proto.pieces if p.type in (CONTROL, UNKNOWN, USER_DEFINED)]
    user_defined = [p.piece for p in proto.pieces if p.type == USER_DEFINED]
    out = []
    for s in specials:
        out += [s, " " + s, s + " ", f"a{s}b", f"Hello {s} world", s + s]
    bytes_text = [f"<0x{b:02X}>" for b in range(256)]
    for u in user_defined[:4]:
        out += [u + w for w in specials + bytes_text] + [u + w + u for w in specials[:64] + bytes_text[:64]]
    return out
