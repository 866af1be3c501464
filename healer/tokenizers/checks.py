"""Doctor checks on the tokenizer files: fast vs slow, ids, added tokens, BOS, PAD."""

from __future__ import annotations

from healer.checkpoint import Checkpoint
from healer.doctor import Check, Context
from healer.report import Finding
from healer.tokenizers.corpus import builtin_corpus
from healer.tokenizers.inventory import inventory, special_tokens

# Families whose pretraining put BOS at the start of every sequence: encoding without it
# shifts every position the model was trained on.
BOS_FAMILIES = {"llama", "mistral", "mixtral", "gemma", "gemma2", "gemma3_text"}
MAX_LISTED = 20


def fix_command(ckpt: Checkpoint, extra: str = "") -> str:
    """The command that repairs `ckpt`, writing beside it (the input is never modified)."""
    out = ckpt.path.parent / f"{ckpt.path.name}-fixed"
    return f"healer fix {ckpt.path} -o {out}{extra}"


def check_missing_fast(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
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


def loader_disagreements(ckpt: Checkpoint, ctx: Context) -> tuple[int, list[str], list[tuple[str, list, list]]]:
    """How many corpus strings the transformers tokenizer of the dir encodes unlike sentencepiece,
    the strings, and the first five (text, sentencepiece ids, transformers ids)."""
    strings = list(builtin_corpus()) + list(ctx.corpus)
    sp = ckpt.sentencepiece()
    got = ckpt.hf_tokenizer()(strings, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    differing = [(t, a, b) for t, a, b in zip(strings, sp.encode(strings), got) if a != b]
    return len(differing), strings, differing[:5]


def check_fast_mismatch(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
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


def check_loader_mismatch(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
    """tokenizer.json agrees with sentencepiece, but what AutoTokenizer builds from the dir does not.

    transformers 5's LlamaTokenizer (and its relatives) replace tokenizer.json's normalizer and
    pre-tokenizer with their own Metaspace(prepend_scheme="first"), which drops a "▁" from text
    starting with spaces: the verified file never reaches the user.
    """
    if not (ckpt.has_sentencepiece and ckpt.has_fast):
        return []
    from healer.tokenizers.compare import compare_encodings

    strings = list(builtin_corpus()) + list(ctx.corpus)
    if compare_encodings(ckpt.sentencepiece(), ckpt.fast_tokenizer(), strings).mismatches:
        return []  # tokenizer.fast_mismatch reports it
    differing, strings, first = loader_disagreements(ckpt, ctx)
    if not differing:
        return []
    text, want, have = first[0]
    cls = type(ckpt.hf_tokenizer()).__name__
    return [Finding(
        "tokenizer.loader_mismatch", "error",
        f"tokenizer.json agrees with tokenizer.model, but transformers loads this dir as {cls}, which "
        f"rebuilds the pipeline and encodes {differing} of {len(strings)} strings differently, e.g. "
        f"{text!r}: sentencepiece {want[:8]} vs transformers {have[:8]}.",
        fix=fix_command(ckpt),
        details={"tokenizer_class": cls, "differing": differing, "compared": len(strings),
                 "first": [{"text": t, "sentencepiece": a, "transformers": b} for t, a, b in first]},
    )]


def check_id_out_of_range(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
    rows = ckpt.embedding_rows
    if rows is None or not ckpt.has_tokenizer:
        return []
    seen: dict[int, str] = {}
    for c in inventory(ckpt).claims:
        if c.id >= rows:
            seen.setdefault(c.id, c.content)
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


def check_dangling_added_token(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
    if not ckpt.has_tokenizer:
        return []
    inv = inventory(ckpt)
    by_id = inv.by_id()
    findings: list[Finding] = []
    collisions = [
        {"id": i, "tokens": {t: inv.sources_of(i, t) for t in sorted(contents)}}
        for i, contents in sorted(by_id.items()) if len(contents) > 1
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


def check_bos(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
    bos = ckpt.special_token("bos")
    if not ckpt.has_tokenizer or not bos:
        return []
    from healer.templates.checks import render_sample

    configured = ckpt.tokenizer_config.get("add_bos_token")
    expected = configured is True or ckpt.model_type in BOS_FAMILIES
    tok = ckpt.hf_tokenizer()
    bos_id = tok.convert_tokens_to_ids(bos)
    ids = tok.encode("Hello world")
    rendered = render_sample(ckpt) if ckpt.chat_template else None
    # A template that writes BOS itself covers chat data; then not adding it on encode is a choice
    # (the usual cure for double BOS), not a defect.
    template_adds_bos = rendered is not None and rendered.startswith(bos)
    findings = []
    if expected and not template_adds_bos and (not ids or ids[0] != bos_id):
        why = ("tokenizer_config.json sets add_bos_token" if configured
               else f"{ckpt.model_type} models are trained with {bos!r} first")
        findings.append(Finding(
            "tokenizer.bos_missing", "error",
            f"encode() does not add {bos!r} ({why}): training data would start without it.",
            fix=fix_command(ckpt),
            details={"bos_token": bos, "bos_id": bos_id, "encoded": ids[:8], "add_bos_token": configured},
        ))
    if template_adds_bos and ids and ids[0] == bos_id:
        encoded = tok.encode(rendered)
        if encoded[:2] == [bos_id, bos_id]:
            findings.append(Finding(
                "tokenizer.double_bos", "warning",
                f"The chat template already starts with {bos!r} and encode() adds another: "
                "templated examples start with two BOS tokens.",
                fix=fix_command(ckpt),
                details={"bos_token": bos, "encoded": encoded[:6]},
            ))
    return findings


def check_pad(ckpt: Checkpoint, ctx: Context) -> list[Finding]:
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
    check_missing_fast, check_fast_mismatch, check_loader_mismatch, check_id_out_of_range, check_dangling_added_token, check_bos, check_pad,
]
