"""Token surgery on a Draft: rename an id, append a token, keep every tokenizer file in step.

The tokenizer files (tokenizer.model, tokenizer.json, tokenizer_config.json's added_tokens_decoder)
must give each id the same text; these helpers edit all of them together. A new id records the
embedding row it needs (`Draft.need_rows`): embeddings.grow_rows adds the rows once, after the
fixes that append.
"""

from __future__ import annotations

import json
import re

from healer.draft import Draft
from healer.errors import HealerError

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
RESERVED = re.compile(r"^(<\|reserved_special_token_\d+\|>|<unused\d+>|\[control_\d+\]|<\|placeholder\d+\|>)$")


def rename_token(draft: Draft, i: int, old: str, new: str) -> None:
    """Give id `i` the text `new` in every tokenizer file (a user-defined piece in sentencepiece)."""
    if draft.read("tokenizer.model"):
        proto = draft.sp_proto()
        if i < len(proto.pieces):
            assert proto.pieces[i].piece == old, (proto.pieces[i].piece, old)
            proto.pieces[i].piece = new
            # user-defined, not control: sentencepiece encodes user-defined pieces from text as one id
            proto.pieces[i].type = proto.pieces[i].USER_DEFINED
            draft.files["tokenizer.model"] = proto.SerializeToString()
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        for t in tj.get("added_tokens") or []:
            if t["id"] == i:
                t["content"], t["special"] = new, True
        vocab = (tj.get("model") or {}).get("vocab")
        if isinstance(vocab, dict) and vocab.get(old) == i:
            vocab[new] = vocab.pop(old)
        elif isinstance(vocab, list) and i < len(vocab) and vocab[i][0] == old:
            vocab[i][0] = new
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    _set_added_decoder(draft, i, new)


def append_token(draft: Draft, new: str, user_defined: bool) -> int:
    """Add `new` as the next id in every tokenizer file; records that an embedding row is needed."""
    i = draft.tokenizer_length()
    if draft.read("tokenizer.model"):
        proto = draft.sp_proto()
        if i != len(proto.pieces):
            raise HealerError(f"cannot append {new!r}: ids {len(proto.pieces)}..{i - 1} are added tokens past "
                              "tokenizer.model; renumbering them is not supported")
        p = proto.pieces.add()
        p.piece, p.score = new, 0.0
        p.type = p.USER_DEFINED if user_defined else p.CONTROL
        draft.files["tokenizer.model"] = proto.SerializeToString()
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        tj.setdefault("added_tokens", []).append({
            "id": i, "content": new, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True})
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    _set_added_decoder(draft, i, new)
    draft.need_rows(i + 1)
    return i


def append_at(draft: Draft, i: int, content: str, special: bool) -> None:
    """Add an added token with an explicit id to tokenizer.json (records the embedding row it needs)."""
    tj = json.loads(draft.read("tokenizer.json"))
    tj.setdefault("added_tokens", []).append({
        "id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
        "normalized": False, "special": special})
    tj["added_tokens"].sort(key=lambda t: t["id"])
    draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    draft.need_rows(i + 1)


def _set_added_decoder(draft: Draft, i: int, content: str) -> None:
    tc = draft.tokenizer_config
    decoder = tc.get("added_tokens_decoder")
    if decoder is None:  # loaders then take added tokens from tokenizer.json / tokenizer.model
        return
    decoder[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": True}
    tc["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
    draft.write_json("tokenizer_config.json", tc)
