"""Tokenizer fixes, beside the checks they answer (`healer/tokenizers/checks.py`).

Each fix is `(Draft, findings, Options) -> None`: it edits the draft and records its changes.
FIXES registers them with the checks they repair and the fixes they need to have run first;
`healer.fix` computes the order from those needs.
"""

from __future__ import annotations

import json
import re
from typing import Any

from healer.draft import Draft, Fix, Options
from healer.model_dir import ModelDir
from healer.report import Finding
from healer.tokenizers.surgery import CHATML_TOKENS, RESERVED, append_at, append_token

FAST_CLASS = "PreTrainedTokenizerFast"
BOS_IN_TEMPLATE = re.compile(r"\{\{-?\s*bos_token\s*-?\}\}")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>", "<PAD>")


def fix_dangling_added_tokens(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make tokenizer_config.json and added_tokens.json agree with the vocabulary loaders use first.

    The authority is tokenizer.json (its vocabulary and added tokens) or, without it,
    tokenizer.model: that is the vocabulary the weights were trained with. Entries of the other
    files that give an id another text are rewritten; entries for tokens the authority lacks
    are added to tokenizer.json when their id is free.
    """
    found = [f for f in findings if f.check == "tokenizer.dangling_added_token"]
    if not found:
        return
    from healer.tokenizers.inventory import inventory

    inv = inventory(draft.ckpt)
    authority_sources = ({"tokenizer.json vocab", "tokenizer.json added_tokens"} if draft.ckpt.has_fast
                         else {"tokenizer.model"})
    authority = {c.id: c.content for c in inv.claims if c.source in authority_sources}
    tc = draft.tokenizer_config
    decoder = tc.get("added_tokens_decoder") or {}
    for key, tok in list(decoder.items()):
        content = tok.get("content") if isinstance(tok, dict) else tok
        i = int(key)
        if i in authority and authority[i] != content:
            decoder[key] = {**tok, "content": authority[i]} if isinstance(tok, dict) else authority[i]
            draft.change("tokenizer.dangling_added_token", "tokenizer_config.json",
                         f"added_tokens_decoder id {i}: {content!r} -> {authority[i]!r} (as the vocabulary says)",
                         content, authority[i])
        elif i not in authority and draft.ckpt.has_fast:
            append_at(draft, i, content, special=bool(tok.get("special", True)) if isinstance(tok, dict) else True)
            draft.change("tokenizer.dangling_added_token", "tokenizer.json", f"added {content!r} as id {i}",
                         None, content)
    tj_added = {t["id"]: t for t in (json.loads(draft.read("tokenizer.json")).get("added_tokens") or [])
                } if draft.read("tokenizer.json") else {}
    if decoder or tc.get("added_tokens_decoder") is not None:
        for i, t in sorted(tj_added.items()):
            if str(i) not in decoder:
                decoder[str(i)] = {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word",
                                                      "special") if k in t}
                draft.change("tokenizer.dangling_added_token", "tokenizer_config.json",
                             f"added_tokens_decoder lists {t['content']!r} (id {i}) like tokenizer.json", None,
                             t["content"])
        tc["added_tokens_decoder"] = dict(sorted(decoder.items(), key=lambda kv: int(kv[0])))
        draft.write_json("tokenizer_config.json", tc)
    legacy = draft.json("added_tokens.json")
    if legacy:
        agreed = {c: i for c, i in legacy.items() if authority.get(i, c) == c}
        if agreed != legacy:
            dropped = sorted(set(legacy) - set(agreed))
            draft.write_json("added_tokens.json", agreed)
            draft.change("tokenizer.dangling_added_token", "added_tokens.json",
                         f"dropped entries that contradict the vocabulary: {dropped}", dropped, None)


def fix_out_of_range(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Ids past the embedding rows: grow the embeddings (default for special tokens) or drop the tokens."""
    found = [f for f in findings if f.check == "tokenizer.id_out_of_range"]
    if not found:
        return
    from healer.tokenizers.inventory import inventory, special_tokens

    rows = draft.ckpt.embedding_rows or 0
    inv = inventory(draft.ckpt)
    past = {c.id: c for c in inv.claims if c.id >= rows}
    wanted = set(special_tokens(draft.ckpt).values())
    _, template = draft.chat_template()
    added_special = {c.content for c in inv.added_claims()}
    mode = opts.out_of_range
    if mode == "auto":
        mode = "grow" if any(c.content in wanted or (template and c.content in template)
                             or c.content in added_special for c in past.values()) else "drop"
    if mode == "grow":
        draft.need_rows(max(past) + 1)
        return  # embeddings.grow_rows writes the rows and config.vocab_size and records the change
    if any(not c.added for c in past.values()):
        draft.unfixable.append(Finding("tokenizer.id_out_of_range", "error",
                                       "Ids past the embedding are part of the base vocabulary; only growing "
                                       "the embeddings (--grow-embeddings) can fix that."))
        return
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        tj["added_tokens"] = [t for t in tj.get("added_tokens") or [] if t["id"] < rows]
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    tc = draft.tokenizer_config
    if tc.get("added_tokens_decoder"):
        tc["added_tokens_decoder"] = {k: v for k, v in tc["added_tokens_decoder"].items() if int(k) < rows}
        draft.write_json("tokenizer_config.json", tc)
    legacy = draft.json("added_tokens.json")
    if legacy:
        draft.write_json("added_tokens.json", {c: i for c, i in legacy.items() if i < rows})
    draft.change("tokenizer.id_out_of_range", "tokenizer files",
                 f"dropped {len(past)} token(s) past the {rows} embedding rows",
                 [c.content for _, c in sorted(past.items())][:20], None)


def fix_fast_tokenizer(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Build tokenizer.json from tokenizer.model and keep it only if it agrees with sentencepiece."""
    ckpt = draft.ckpt
    wanted = [f for f in findings
              if f.check in ("tokenizer.missing_fast", "tokenizer.fast_mismatch", "tokenizer.loader_mismatch")]
    sp_edited = "tokenizer.model" in draft.files
    if not ckpt.has_sentencepiece and any(f.check == "tokenizer.loader_mismatch" for f in wanted):
        use_fast_class(draft, "tokenizer.loader_mismatch")  # tokenizer.json is the reference: load it as written
        return
    if not ckpt.has_sentencepiece or not (wanted or sp_edited):
        return
    from healer.tokenizers.convert import convert_verified
    from healer.tokenizers.corpus import builtin_corpus

    tc = draft.tokenizer_config
    added = {int(i): t["content"] if isinstance(t, dict) else t
             for i, t in (tc.get("added_tokens_decoder") or {}).items()}
    pieces = draft.sp_proto().pieces
    added = {i: t for i, t in added.items() if i >= len(pieces) or t in CHATML_TOKENS}
    added.update({i: p.piece for i, p in enumerate(pieces) if p.piece in CHATML_TOKENS})
    # ChatML puts text right after its tokens: prefix it as llama.cpp will (see convert.py)
    result = convert_verified(
        draft.read("tokenizer.model"), list(builtin_corpus()) + list(opts.corpus), added,
        add_bos=wants_bos(ckpt, tc), add_eos=bool(tc.get("add_eos_token", False)),
        prefix_after_specials=any(t in CHATML_TOKENS for t in added.values()),
    )
    check = wanted[0].check if wanted else "template.chatml"
    if not result.ok:
        first = [{"text": m.text, "sentencepiece": m.sp_ids, "fast": m.fast_ids}
                 for m in result.first_disagreements()]
        draft.unfixable.append(Finding(
            check, "error", "No tokenizer.json candidate agrees with sentencepiece on every string; "
            "keeping the slow tokenizer only.", details={"first": first}))
        if ckpt.has_fast:  # a known-wrong tokenizer.json is worse than none
            draft.files["tokenizer.json"] = b""
        return
    draft.files["tokenizer.json"] = result.tokenizer_json.encode("utf-8")
    draft.change(check, "tokenizer.json",
                 f"built from tokenizer.model ({result.candidate} pipeline), identical to sentencepiece on "
                 f"{result.comparison.n} strings", before="present" if ckpt.has_fast else None, after="verified")
    if "add_bos_token" not in tc and wants_bos(ckpt, tc):
        tc["add_bos_token"] = True
        draft.write_json("tokenizer_config.json", tc)
    use_fast_class(draft, check)


def use_fast_class(draft: Draft, check: str) -> None:
    """tokenizer_class = PreTrainedTokenizerFast, so transformers loads tokenizer.json as written.

    transformers 5's LlamaTokenizer & co. swap tokenizer.json's normalizer and pre-tokenizer
    for their own (tokenizer.loader_mismatch); the generic class keeps the file's.
    """
    tc = draft.tokenizer_config
    if tc.get("tokenizer_class") == FAST_CLASS:
        return
    before = tc.get("tokenizer_class")
    tc["tokenizer_class"] = FAST_CLASS
    draft.write_json("tokenizer_config.json", tc)
    draft.change(check, "tokenizer_config.json", f"tokenizer_class = {FAST_CLASS}, so transformers loads "
                 "tokenizer.json as written", before, FAST_CLASS)


def wants_bos(ckpt: ModelDir, tc: dict[str, Any]) -> bool:
    """Whether encode() should add BOS: configured, or the family is trained with it."""
    from healer.tokenizers.bos import starts_with_bos

    return bool(ckpt.special_token("bos")) and starts_with_bos(ckpt.model_type, tc)


def fix_bos_missing(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make encode() add BOS: tokenizer_config add_bos_token and tokenizer.json's post-processor."""
    found = [f for f in findings if f.check == "tokenizer.bos_missing"]
    if not found:
        return
    ckpt, tc = draft.ckpt, draft.tokenizer_config
    bos = ckpt.special_token("bos")
    before = tc.get("add_bos_token")
    tc["add_bos_token"] = True
    draft.write_json("tokenizer_config.json", tc)
    draft.change("tokenizer.bos_missing", "tokenizer_config.json", "add_bos_token = true", before, True)
    data = draft.read("tokenizer.json")
    if data:
        tj = json.loads(data)
        bos_id = found[0].details.get("bos_id")
        old = tj.get("post_processor")
        tj["post_processor"] = bos_post_processor(old, bos, bos_id, bool(tc.get("add_eos_token")),
                                                  ckpt.special_token("eos"), _token_id(tj, ckpt.special_token("eos")))
        draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
        draft.change("tokenizer.bos_missing", "tokenizer.json", f"post-processor adds {bos!r} (single and pair)",
                     old and old.get("type"), "TemplateProcessing")


def fix_setting_ignored(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Make tokenizer.json's post-processor do what add_bos_token / add_eos_token say."""
    found = [f for f in findings if f.check == "tokenizer.setting_ignored"]
    data = draft.read("tokenizer.json")
    if not found or not data or any(f.check == "tokenizer.bos_missing" for f in findings):
        return  # fix_bos_missing writes the post-processor with the configured EOS too
    ckpt, tc = draft.ckpt, draft.tokenizer_config
    tj = json.loads(data)
    old = tj.get("post_processor")
    bos, eos = ckpt.special_token("bos"), ckpt.special_token("eos")
    add_bos = bool(bos) and tc.get("add_bos_token", wants_bos(ckpt, tc)) is True
    tj["post_processor"] = special_post_processor(old, bos if add_bos else None, _token_id(tj, bos),
                                                  eos if tc.get("add_eos_token") is True else None, _token_id(tj, eos))
    draft.files["tokenizer.json"] = json.dumps(tj, ensure_ascii=False).encode("utf-8")
    settings = ", ".join(f"{s['setting']} = {str(s['configured']).lower()}" for s in found[0].details["settings"])
    draft.change("tokenizer.setting_ignored", "tokenizer.json", f"post-processor follows {settings}",
                 old and old.get("type"), (tj["post_processor"] or {}).get("type"))


def _token_id(tj: dict[str, Any], content: str | None) -> int | None:
    if content is None:
        return None
    for t in tj.get("added_tokens") or []:
        if t["content"] == content:
            return t["id"]
    vocab = (tj.get("model") or {}).get("vocab")
    if isinstance(vocab, dict):
        return vocab.get(content)
    if isinstance(vocab, list):
        return next((i for i, (p, _) in enumerate(vocab) if p == content), None)
    return None


def bos_post_processor(old: dict | None, bos: str, bos_id: int, add_eos: bool, eos: str | None,
                       eos_id: int | None) -> dict[str, Any]:
    """A TemplateProcessing that writes BOS (and EOS if configured), after a kept ByteLevel step."""
    return special_post_processor(old, bos, bos_id, eos if add_eos else None, eos_id)


def special_post_processor(old: dict | None, bos: str | None, bos_id: int | None, eos: str | None,
                           eos_id: int | None) -> dict[str, Any] | None:
    """A post-processor that writes `bos` before and `eos` after each sequence (None: not that one).

    Byte-level tokenizers need their ByteLevel post-processor for offsets: it is kept in front.
    """
    kept = []
    if old and old.get("type") == "ByteLevel":
        kept = [old]
    elif old and old.get("type") == "Sequence":
        kept = [p for p in old.get("processors", []) if p.get("type") == "ByteLevel"]
    front = [{"SpecialToken": {"id": bos, "type_id": 0}}] if bos is not None and bos_id is not None else []
    back = [{"SpecialToken": {"id": eos, "type_id": 0}}] if eos is not None and eos_id is not None else []
    if not front and not back:
        return kept[0] if kept else None

    def with_type(items: list[dict], type_id: int) -> list[dict]:
        return [{"SpecialToken": {**x["SpecialToken"], "type_id": type_id}} for x in items]

    single = [*front, {"Sequence": {"id": "A", "type_id": 0}}, *back]
    pair = single + [*with_type(front, 1), {"Sequence": {"id": "B", "type_id": 1}}, *with_type(back, 1)]
    specials = {}
    if front:
        specials[bos] = {"id": bos, "ids": [bos_id], "tokens": [bos]}
    if back:
        specials[eos] = {"id": eos, "ids": [eos_id], "tokens": [eos]}
    template = {"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials}
    return {"type": "Sequence", "processors": [*kept, template]} if kept else template


def fix_double_bos(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Stop the chat template from writing BOS when the tokenizer adds it on encode.

    We keep BOS in the tokenizer rather than the template: raw-text (pretraining-style) data
    then still gets it, and templated data gets exactly one.
    """
    if not any(f.check == "tokenizer.double_bos" for f in findings):
        return
    where, text = draft.chat_template()
    if text is None:
        return
    new, n = BOS_IN_TEMPLATE.subn("", text, count=1)
    if n == 0:
        draft.unfixable.append(Finding("tokenizer.double_bos", "warning",
                                       "The template writes BOS in a way fix cannot remove safely; edit it by hand."))
        return
    draft.set_chat_template(new)
    draft.change("tokenizer.double_bos", where, "chat template no longer writes bos_token (the tokenizer adds it)",
                 "{{ bos_token }}", None)


def fix_pad(draft: Draft, findings: list[Finding], opts: Options) -> None:
    """Give the model a pad token that is not eos: an existing pad/reserved token, else a new one."""
    found = [f for f in findings if f.check in ("tokenizer.pad_is_eos", "tokenizer.pad_missing")]
    if not found:
        return
    ckpt = draft.ckpt
    from healer.tokenizers.inventory import inventory, special_tokens

    inv = inventory(ckpt)
    by_content = {c.content: c.id for c in inv.claims}
    declared = set(special_tokens(ckpt).values())
    _, template = draft.chat_template()
    rows = ckpt.embedding_rows or 0
    pad, pad_id = None, None
    for name in PAD_NAMES:
        if name in by_content and by_content[name] < rows and name not in declared:
            pad, pad_id = name, by_content[name]
            break
    if pad is None:
        reserved = sorted((i, c) for c, i in by_content.items() if RESERVED.match(c) and i < rows
                          and c not in declared and (template is None or c not in template))
        if reserved:
            pad_id, pad = reserved[-1]  # the last reserved token: the first ones are what ChatML takes
    check = found[0].check
    if pad is None:
        pad = "<|pad|>"
        pad_id = append_token(draft, pad, user_defined=False)
        draft.change(check, "tokenizer files", f"added {pad!r} as id {pad_id}", None, pad)
    before = ckpt.special_token("pad")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        obj = draft.json(name)
        if obj is None and name == "special_tokens_map.json":
            continue
        obj = obj or {}
        obj["pad_token"] = pad
        draft.write_json(name, obj)
    draft.change(check, "tokenizer_config.json", f"pad_token = {pad!r} (id {pad_id})", before, pad)
    for name in ("config.json", "generation_config.json"):
        obj = draft.json(name)
        if obj is None:
            continue
        old = obj.get("pad_token_id")
        obj["pad_token_id"] = pad_id
        draft.write_json(name, obj)
        draft.change(check, name, f"pad_token_id = {pad_id}", old, pad_id)


FIXES: list[Fix] = [
    Fix("tokenizer.dangling_added_tokens", fix_dangling_added_tokens, checks=("tokenizer.dangling_added_token",)),
    # drops (or keeps, for growing) the ids past the embedding: the added-token entries fix_dangling_added_tokens
    # settles, and the tokens it appends to tokenizer.json (which dropping them after would undo)
    Fix("tokenizer.out_of_range", fix_out_of_range, checks=("tokenizer.id_out_of_range",),
        needs=("tokenizer.dangling_added_tokens",)),
    # builds tokenizer.json from the tokenizer.model --chatml edits (an edited tokenizer.model alone triggers it),
    # with the added tokens of the added_tokens_decoder the two fixes above rewrite
    Fix("tokenizer.fast_tokenizer", fix_fast_tokenizer,
        checks=("tokenizer.missing_fast", "tokenizer.fast_mismatch", "tokenizer.loader_mismatch"),
        needs=("tokenizer.dangling_added_tokens", "tokenizer.out_of_range", "template.chatml")),
    # both edit the post-processor of the tokenizer.json fix_fast_tokenizer may have replaced whole
    Fix("tokenizer.bos_missing", fix_bos_missing, checks=("tokenizer.bos_missing",),
        needs=("tokenizer.fast_tokenizer",)),
    Fix("tokenizer.setting_ignored", fix_setting_ignored, checks=("tokenizer.setting_ignored",),
        needs=("tokenizer.fast_tokenizer",)),
    # takes bos_token out of the template the template fixes install
    Fix("tokenizer.double_bos", fix_double_bos, checks=("tokenizer.double_bos",),
        needs=("template.chatml", "template.set", "template.generation_prompt")),
    # keeps the reserved tokens the final template uses, and appends a new pad after the ids the
    # vocabulary fixes settled, in the tokenizer.json fix_fast_tokenizer wrote
    Fix("tokenizer.pad", fix_pad, checks=("tokenizer.pad_is_eos", "tokenizer.pad_missing"),
        needs=("tokenizer.dangling_added_tokens", "tokenizer.out_of_range", "template.chatml", "template.set",
               "template.generation_prompt", "tokenizer.double_bos", "tokenizer.fast_tokenizer")),
]
