"""Doctor checks on the tokenizer files: fast vs slow, ids, added tokens, BOS, PAD."""

from __future__ import annotations

from healer.model_dir import ModelDir
from healer.report import Check, Context, Finding, fix_command
from healer.tokenizers.bos import chat_ids, starts_with_bos
from healer.tokenizers.corpus import builtin_corpus
from healer.tokenizers.inventory import inventory, special_tokens

MAX_LISTED = 20


def check_missing_fast(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """Only tokenizer.model: info when transformers' on-the-fly conversion encodes like
    sentencepiece, an error when it does not (measured on the corpus)."""
    if not ckpt.has_sentencepiece or ckpt.has_fast:
        return []
    differing, strings, first = loader_disagreements(ckpt, ctx)
    if not differing:
        return [Finding(
            "tokenizer.missing_fast", "info",
            "Only a sentencepiece tokenizer.model is present; loaders convert it on the fly, "
            "and that conversion is not always faithful.",
            fix=fix_command(ckpt),
            details={"files": ["tokenizer.model"]},
        )]
    text, want, have = first[0]
    return [Finding(
        "tokenizer.missing_fast", "error",
        f"Only a sentencepiece tokenizer.model is present, and the tokenizer transformers builds from it "
        f"encodes {differing} of {len(strings)} strings differently, e.g. {text!r}: sentencepiece {want[:8]} "
        f"vs transformers {have[:8]}.",
        fix=fix_command(ckpt),
        details={"files": ["tokenizer.model"], "differing": differing, "compared": len(strings),
                 "first": [{"text": t, "sentencepiece": a, "transformers": b} for t, a, b in first]},
    )]


def loader_disagreements(ckpt: ModelDir, ctx: Context) -> tuple[int, list[str], list[tuple[str, list, list]]]:
    """How many corpus strings the transformers tokenizer of the dir encodes unlike sentencepiece,
    the strings, and the first five (text, sentencepiece ids, transformers ids)."""
    strings = list(builtin_corpus()) + list(ctx.corpus)
    sp = ckpt.sentencepiece()
    got = ckpt.hf_tokenizer()(strings, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    differing = [(t, a, b) for t, a, b in zip(strings, sp.encode(strings), got) if a != b]
    return len(differing), strings, differing[:5]


def check_fast_mismatch(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    if not (ckpt.has_sentencepiece and ckpt.has_fast):
        return []
    from healer.tokenizers.compare import compare_encodings

    strings = list(builtin_corpus()) + list(ctx.corpus)
    result = compare_encodings(ckpt.sentencepiece(), ckpt.fast_tokenizer(), strings)
    if not result.mismatches:
        return []
    first = [
        {"text": m.text, "sentencepiece": m.sp_ids, "fast": m.fast_ids, "first_difference": m.first_diff}
        for m in result.mismatches[:5]
    ]
    return [Finding(
        "tokenizer.fast_mismatch", "error",
        f"tokenizer.json encodes {len(result.mismatches)} of {result.n} strings differently from "
        f"tokenizer.model (sentencepiece), e.g. {first[0]['text']!r}: "
        f"sentencepiece {first[0]['sentencepiece'][:8]} vs fast {first[0]['fast'][:8]}.",
        fix=fix_command(ckpt),
        details={"differing": len(result.mismatches), "compared": result.n, "first": first},
    )]


def check_loader_mismatch(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """What AutoTokenizer builds from the dir encodes unlike the files it was given.

    transformers 5's LlamaTokenizer (and its relatives) replace tokenizer.json's normalizer and
    pre-tokenizer with their own Metaspace(prepend_scheme="first"), which drops a "▁" from text
    starting with spaces: the verified file never reaches the user. The reference is
    tokenizer.model (sentencepiece) when there is one, tokenizer.json as written otherwise
    (the usual layout of fine-tuned Llama 2 / Mistral repos).
    """
    if not ckpt.has_fast:
        return []
    from healer.tokenizers.compare import compare_encodings

    strings = list(builtin_corpus()) + list(ctx.corpus)
    if ckpt.has_sentencepiece:
        if compare_encodings(ckpt.sentencepiece(), ckpt.fast_tokenizer(), strings).mismatches:
            return []  # tokenizer.fast_mismatch reports it
        differing, strings, first = loader_disagreements(ckpt, ctx)
        reference, agrees = "sentencepiece", "tokenizer.json agrees with tokenizer.model, but "
    else:
        differing, strings, first = tokenizer_json_disagreements(ckpt, strings)
        reference, agrees = "tokenizer.json", ""
    if not differing:
        return []
    text, want, have = first[0]
    cls = type(ckpt.hf_tokenizer()).__name__
    return [Finding(
        "tokenizer.loader_mismatch", "error",
        f"{agrees}transformers loads this dir as {cls}, which rebuilds tokenizer.json's pipeline and encodes "
        f"{differing} of {len(strings)} strings differently, e.g. {text!r}: {reference} {want[:8]} vs "
        f"transformers {have[:8]}.",
        fix=fix_command(ckpt),
        details={"tokenizer_class": cls, "differing": differing, "compared": len(strings), "reference": reference,
                 "first": [{"text": t, reference: a, "transformers": b} for t, a, b in first]},
    )]


def tokenizer_json_disagreements(ckpt: ModelDir, strings: list[str]) -> tuple[int, list[str], list]:
    """Like `loader_disagreements`, with tokenizer.json as written (tokenizers' own loader) as the reference."""
    fast = ckpt.fast_tokenizer()
    want = [e.ids for e in fast.encode_batch_fast(strings, add_special_tokens=False)]
    got = ckpt.hf_tokenizer()(strings, add_special_tokens=False)["input_ids"]
    differing = [(t, a, b) for t, a, b in zip(strings, want, got) if a != b]
    return len(differing), strings, differing[:5]


def check_id_out_of_range(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    rows = ckpt.embedding_rows
    if rows is None or not ckpt.has_tokenizer:
        return []
    seen = inventory(ckpt).ids_from(rows)
    if not seen:
        return []
    tokens = [{"id": i, "token": t} for i, t in sorted(seen.items())]
    return [Finding(
        "tokenizer.id_out_of_range", "error",
        f"{len(tokens)} token id(s) are past the {rows} embedding rows (e.g. {tokens[0]['token']!r} = "
        f"{tokens[0]['id']}): encoding them reads out of bounds on GPU.",
        fix=fix_command(ckpt),
        details={"embedding_rows": rows, "tokens": tokens[:MAX_LISTED], "count": len(tokens)},
    )]


def check_dangling_added_token(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    if not ckpt.has_tokenizer:
        return []
    inv = inventory(ckpt)
    findings: list[Finding] = []
    collisions = [
        {"id": i, "tokens": {t: inv.sources_of(i, t) for t in sorted(contents)}}
        for i, contents in sorted(inv.collisions().items())
    ]
    if collisions:
        c = collisions[0]
        desc = "; ".join(f"{t!r} in {', '.join(srcs)}" for t, srcs in c["tokens"].items())
        findings.append(Finding(
            "tokenizer.dangling_added_token", "error",
            f"{len(collisions)} token id(s) mean different tokens in different files, e.g. id {c['id']}: {desc}.",
            fix=fix_command(ckpt),
            details={"collisions": collisions[:MAX_LISTED], "count": len(collisions)},
        ))
    # tokenizer.json is what loaders use first; added_tokens_decoder must list its added tokens
    # for transformers' own bookkeeping. added_tokens.json is legacy and partial by design.
    problems = []
    sources = inv.sources()
    fast = {"tokenizer.json vocab", "tokenizer.json added_tokens"}
    decoder = "tokenizer_config.json added_tokens_decoder"
    for content in sorted({c.content for c in inv.added_claims()}):
        ids = inv.ids_of(content)
        if len(ids) > 1:
            problems.append({"token": content, "problem": f"has ids {sorted(ids)} in different files"})
            continue
        (i,) = ids
        have = set(inv.sources_of(i, content))
        missing = []
        if ckpt.has_fast and not have & fast:
            missing.append("tokenizer.json")
        if decoder in sources and decoder not in have and "tokenizer.json added_tokens" in have:
            missing.append(decoder)
        if missing:
            problems.append({"token": content, "id": i, "problem": f"missing from {', '.join(missing)}"})
    for name, content in special_tokens(ckpt).items():
        if sources and not inv.ids_of(content):
            problems.append({"token": content, "problem": f"declared as {name} token but is in no vocabulary"})
    if problems:
        p = problems[0]
        findings.append(Finding(
            "tokenizer.dangling_added_token", "warning",
            f"{len(problems)} token(s) are described differently by the tokenizer files, e.g. {p['token']!r} "
            f"{p['problem']}.",
            fix=fix_command(ckpt),
            details={"tokens": problems[:MAX_LISTED], "count": len(problems)},
        ))
    return findings


def check_bos(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """BOS on both paths into the model: encode() for raw text, the rendered template for chats."""
    bos = ckpt.special_token("bos")
    if not ckpt.has_tokenizer or not bos:
        return []
    from healer.templates.checks import render_sample

    tc = ckpt.tokenizer_config
    configured = tc.get("add_bos_token")
    expected = starts_with_bos(ckpt.model_type, tc)
    tok = ckpt.hf_tokenizer()
    bos_id = tok.convert_tokens_to_ids(bos)
    ids = tok.encode("Hello world")
    findings = []
    # Raw-text and completion data go through encode(), whatever the chat template writes.
    if expected and (not ids or ids[0] != bos_id):
        if configured is True:
            why = (f"tokenizer_config.json sets add_bos_token, but transformers loads this dir as "
                   f"{type(tok).__name__}, which ignores that setting: tokenizer.json's post-processor decides")
        else:
            why = f"{ckpt.model_type} models are trained with {bos!r} first"
        findings.append(Finding(
            "tokenizer.bos_missing", "error",
            f"encode() does not add {bos!r} ({why}): raw-text training data would start without it.",
            fix=fix_command(ckpt),
            details={"bos_token": bos, "bos_id": bos_id, "encoded": ids[:8], "add_bos_token": configured,
                     "tokenizer_class": type(tok).__name__},
        ))
    rendered = render_sample(ckpt) if ckpt.chat_template else None
    if rendered is not None:
        # the chat path, as trainer run trains and llama.cpp serves it (healer.tokenizers.bos)
        ids_of_chat = chat_ids(tok, rendered, bos_id if expected else None)
        if ids_of_chat[:2] == [bos_id, bos_id]:
            findings.append(Finding(
                "tokenizer.double_bos", "warning",
                f"The chat template writes {bos!r} twice at the start: templated examples start with two BOS tokens.",
                fix=fix_command(ckpt),
                details={"bos_token": bos, "encoded": ids_of_chat[:6]},
            ))
    return findings


def check_setting_ignored(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    """tokenizer_config.json's add_bos_token / add_eos_token against what encode() really does.

    transformers 5 loads most tokenizer.json dirs as TokenizersBackend, which leaves BOS/EOS to
    tokenizer.json's post-processor and ignores those two settings. A BOS that should be there
    and is not is `tokenizer.bos_missing`; this reports the other disagreements.
    """
    if not ckpt.has_tokenizer:
        return []
    tc = ckpt.tokenizer_config
    tok = ckpt.hf_tokenizer()
    probe = tok.encode("Hello world", add_special_tokens=False)
    ids = tok.encode("Hello world")
    ignored = []
    for setting, role, present in (
        ("add_bos_token", "bos", ids[: len(ids) - len(probe)].count(tok.bos_token_id) > 0),
        ("add_eos_token", "eos", tok.eos_token_id is not None and ids[len(probe):].count(tok.eos_token_id) > 0),
    ):
        value = tc.get(setting)
        token = ckpt.special_token(role)
        if not isinstance(value, bool) or token is None or value == present:
            continue
        if setting == "add_bos_token" and value:
            continue  # tokenizer.bos_missing
        ignored.append({"setting": setting, "configured": value, "encode_adds": present, "token": token})
    if not ignored:
        return []
    first = ignored[0]
    return [Finding(
        "tokenizer.setting_ignored", "warning",
        f"tokenizer_config.json sets {first['setting']}: {str(first['configured']).lower()}, but transformers loads "
        f"this dir as {type(tok).__name__} and encode() {'adds' if first['encode_adds'] else 'does not add'} "
        f"{first['token']!r}: the setting has no effect.",
        fix=fix_command(ckpt),
        details={"tokenizer_class": type(tok).__name__, "settings": ignored},
    )]


def check_pad(ckpt: ModelDir, ctx: Context) -> list[Finding]:
    if not ckpt.has_tokenizer:
        return []
    pad, eos = ckpt.special_token("pad"), ckpt.special_token("eos")
    pad_id, eos_id = ckpt.config.get("pad_token_id"), ckpt.config.get("eos_token_id")
    eos_ids = set(eos_id) if isinstance(eos_id, list) else {eos_id}
    if pad is None and pad_id is None:
        return [Finding(
            "tokenizer.pad_missing", "info",
            "No pad token is set; batching code will pick one, often eos (which hides EOS from the loss).",
            fix=fix_command(ckpt),
        )]
    if (pad is not None and pad == eos) or (pad_id is not None and pad_id in eos_ids):
        return [Finding(
            "tokenizer.pad_is_eos", "warning",
            f"pad token is the eos token ({pad or pad_id!r}): masking padding as -100 also masks every EOS, "
            "so the model never learns to stop.",
            fix=fix_command(ckpt),
            details={"pad_token": pad, "eos_token": eos, "pad_token_id": pad_id},
        )]
    return []


CHECKS: list[Check] = [
    check_missing_fast, check_fast_mismatch, check_loader_mismatch, check_id_out_of_range, check_dangling_added_token, check_bos,
    check_setting_ignored, check_pad,
]
