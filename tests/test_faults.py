"""Fault injection: every command on broken input, odd paths, full or read-only disks and absurd flags.

Each case is (command line, how its input is broken, expected exit code, a fragment of the message that names
the file or flag). Every case is also held to the invariants the README promises on bad input:
  - no traceback (one line on stderr, `error: ...`) without --debug;
  - every file the command could read is byte-identical afterwards (sha256 and mode);
  - nothing new appears outside OUT, and no staging leftovers (`.OUT.healer-*`, `.OUT.tmp-*`) anywhere;
  - the command ends within CASE_SECONDS.
Commands run in this process through click's runner (a subprocess would spend seconds importing torch per
case); the tiny checkpoint, data and run dir are built once per module and copied into each case's own dir.
Full-disk and read-only cases put OUT on a small tmpfs; where mounting is not allowed they are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import builders
import pytest
import testdata
from click.testing import CliRunner

import cli

CASE_SECONDS = 60
REPO = Path(__file__).resolve().parents[1]
TRAIN = ("--template", "llama-2", "--max-steps", "1", "--batch-size", "1", "--grad-accum", "1", "--lora-r", "4",
         "--device", "cpu", "--load-in-16bit")


# ----------------------------------------------------------------------------- the inputs, built once


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """model/ (tiny Llama, real Llama-2 tokenizer), chat.jsonl, and run/ (a finished one-step run)."""
    from trainer.config import resolve_config
    from trainer.loop import train

    root = tmp_path_factory.mktemp("pristine")
    builders.sentencepiece_checkpoint(root / "model", testdata.sentencepiece_model("llama-spm"),
                                      tokenizer_json=testdata.fast_tokenizer_json("llama-spm"))
    rows = [{"messages": [{"role": "user", "content": f"What colour is item {k}?"},
                          {"role": "assistant", "content": f"Item {k} is red."}]} for k in range(4)]
    (root / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    config = resolve_config(model=str(root / "model"), data=str(root / "chat.jsonl"), out=str(root / "run"),
                            template="llama-2", max_steps=1, batch_size=1, grad_accum=1, lora_r=4, device="cpu",
                            load_in_4bit=False)
    train(config, console=_quiet())
    return root


def _quiet():
    import io

    from rich.console import Console

    return Console(file=io.StringIO())


# ----------------------------------------------------------------------------- ways to break an input


def edit_json(rel: str, change: Callable) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        p = work / rel
        obj = json.loads(p.read_text(encoding="utf-8"))
        change(obj)  # edits in place
        p.write_text(json.dumps(obj), encoding="utf-8")
    return breaks


def write_file(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        p = work / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    return breaks


def edit_header(rel: str, change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Rewrite a safetensors header (the data after it stays where its offsets point)."""
    def breaks(work: Path) -> None:
        p = work / rel
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        change(header)
        new = json.dumps(header).encode()
        new += b" " * (-len(new) % 8)
        p.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    return breaks


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def embed_tensor(header: dict) -> str:
    return next(k for k in header if k.endswith("embed_tokens.weight"))


def overlap(header: dict) -> None:
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[b]["data_offsets"] = header[a]["data_offsets"][:]
    header[b]["shape"], header[b]["dtype"] = header[a]["shape"], header[a]["dtype"]


def transpose_embedding(header: dict) -> None:
    name = embed_tensor(header)
    header[name]["shape"] = header[name]["shape"][::-1]


def int32_embedding(header: dict) -> None:
    header[embed_tensor(header)]["dtype"] = "I32"


def f8_tensor(header: dict) -> None:
    # F8_E4M3 is a real safetensors dtype (one byte): export has no conversion for it
    name = next(k for k in header if k.endswith("q_proj.weight"))
    start, end = header[name]["data_offsets"]
    header[name]["dtype"] = "F8_E4M3"
    header[name]["data_offsets"] = [start, start + (end - start) // 4]


def dangling_link(rel: str) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        (work / rel).symlink_to(work / "no-such-file")
    return breaks


def remove(rel: str) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        (work / rel).unlink()
    return breaks


def both(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def breaks(work: Path) -> None:
        for step in steps:
            step(work)
    return breaks


def mark_failed(work: Path) -> None:
    edit_json("run/run.json", lambda r: r.update(status="failed", error="out of GPU memory"))(work)


def mark_killed(work: Path) -> None:
    edit_json("run/run.json", lambda r: r.update(status="running", pid=dead_pid()))(work)


def non_utf8_copy(work: Path) -> None:
    os.rename(work / "model", os.fsencode(work) + b"/model-\xff")


def adapter_config(change: Callable[[dict], None]) -> Callable[[Path], None]:
    return edit_json("run/adapter/adapter_config.json", change)


def flatten_lora_a(header: dict) -> None:
    name = next(k for k in header if "lora_A" in k)
    rows, cols = header[name]["shape"]
    header[name]["shape"] = [rows * cols]


TEMPLATE_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
TEMPLATE_10GB = "{{ 'x' * 10000000000 }}"
BAD_SYNTAX = "{% for m in messages %}{{ m.content }"


def template_file(text: str | bytes) -> Callable[[Path], None]:
    return write_file("model/chat_template.jinja", text)


def not_json_array(work: Path) -> None:
    (work / "chat.jsonl").unlink()
    (work / "chat.json").write_text(json.dumps([{"messages": [{"role": "user", "content": "hi"},
                                                              {"role": "assistant", "content": "yo"}]}, 7]))


# ----------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class Case:
    id: str
    command: str  # healer | trainer
    args: tuple[str, ...]  # {model} {data} {run} {work} {out} are filled in
    code: int
    fragment: str  # must appear in stderr (exit 2) or in the output (exit 0/1)
    breaks: Callable[[Path], None] | None = None
    disk: str | None = None  # "full" or "readonly": {out} lies on a small tmpfs
    writes: tuple[str, ...] = ()  # paths under the case dir the command may create or change
    stale: tuple[str, ...] = ()  # made just before the command, must be gone after: a killed run's leftovers
    # ({dead}: a pid no process has), an OUT that --force replaces


FIX = ("fix", "{model}")
EXPORT = ("export", "{run}")
RUN = ("run", "--model", "{model}", "--data", "{data}", *TRAIN)

CASES = [
    # 1. data loss: an output that is, contains or lies inside an input, --force or not
    Case("fix-out-is-input-parent", "healer", (*FIX, "-o", "{work}", "--force"), 2, "contains the input"),
    Case("fix-out-is-input", "healer", (*FIX, "-o", "{model}", "--force"), 2, "is the input"),
    Case("fix-out-inside-input", "healer", (*FIX, "-o", "{model}/fixed"), 2, "lies inside the input"),
    Case("fix-out-is-a-link-to-input", "healer", (*FIX, "-o", "{work}/link", "--force"), 2, "is the input",
         breaks=lambda work: (work / "link").symlink_to(work / "model")),
    Case("fix-out-is-corpus", "healer", (*FIX, "-o", "{data}", "--corpus", "{data}", "--force"), 2, "is the input"),
    Case("fix-out-exists", "healer", (*FIX, "-o", "{run}"), 2, "--force"),
    Case("export-out-is-base", "trainer", (*EXPORT, "-o", "{model}", "--force"), 2, "is the input"),
    Case("export-out-is-run", "trainer", (*EXPORT, "-o", "{run}", "--force"), 2, "is the input"),
    Case("export-gguf-inside-base", "trainer", (*EXPORT, "--format", "gguf", "-o", "{model}/m.gguf", "--force"), 2,
         "lies inside the input"),
    Case("export-out-contains-run", "trainer", (*EXPORT, "-o", "{work}", "--force"), 2, "contains the input"),
    Case("run-out-is-model", "trainer", (*RUN, "--out", "{model}", "--force"), 2, "is the input"),
    Case("run-out-contains-data", "trainer", (*RUN, "--out", "{work}", "--force"), 2, "contains the input"),
    Case("run-into-finished-run", "trainer", (*RUN, "--out", "{run}"), 2, "--resume"),
    Case("run-into-failed-run", "trainer", (*RUN, "--out", "{run}"), 2, "failed", breaks=mark_failed),
    Case("run-into-killed-run", "trainer", (*RUN, "--out", "{run}"), 2, "(killed)", breaks=mark_killed),
    # 2. nonsense that used to succeed
    Case("run-lr-inf", "trainer", (*RUN, "--out", "{out}", "--lr", "inf"), 2, "lr must be a finite number"),
    Case("run-lr-huge", "trainer", (*RUN, "--out", "{out}", "--lr", "1e300"), 2, "lr must be positive and at most"),
    Case("run-grad-norm-nan", "trainer", (*RUN, "--out", "{out}", "--max-grad-norm", "nan"), 2,
         "max_grad_norm must be a finite number"),
    Case("run-alpha-zero", "trainer", (*RUN, "--out", "{out}", "--lora-alpha", "0"), 2, "lora_alpha must be positive"),
    Case("run-max-steps-absurd", "trainer", (*RUN, "--out", "{out}", "--max-steps", "1000000000"), 2,
         "lower --max-steps"),
    Case("run-epochs-1e9", "trainer", ("run", "--model", "{model}", "--data", "{data}", "--out", "{out}",
                                       "--epochs", "1000000000"), 2, "epochs must be at most"),
    Case("run-rank-absurd", "trainer", (*RUN, "--out", "{out}", "--lora-r", "1000000000"), 2,
         "lora_r must be at most"),
    Case("run-rank-over-hidden", "trainer", (*RUN, "--out", "{out}", "--lora-r", "512"), 2, "hidden size 64"),
    Case("doctor-int32-embedding", "healer", ("doctor", "{model}"), 2, "embed_tokens",
         breaks=edit_header("model/model.safetensors", int32_embedding)),
    Case("doctor-overlapping-tensors", "healer", ("doctor", "{model}", "--check-weights"), 2, "overlap",
         breaks=edit_header("model/model.safetensors", overlap)),
    Case("fix-transposed-embedding", "healer", (*FIX, "-o", "{out}"), 2, "embed_tokens",
         breaks=edit_header("model/model.safetensors", transpose_embedding)),
    Case("fix-no-tokenizer", "healer", (*FIX, "-o", "{out}"), 2, "no tokenizer",
         breaks=both(remove("model/tokenizer.model"), remove("model/tokenizer.json"),
                     remove("model/tokenizer_config.json"))),
    # 3. one line instead of a traceback
    Case("doctor-header-entry-without-offsets", "healer", ("doctor", "{model}"), 2, "model.safetensors",
         breaks=edit_header("model/model.safetensors", lambda h: h[first_tensor(h)].pop("data_offsets"))),
    Case("doctor-header-entry-is-a-string", "healer", ("doctor", "{model}"), 2, "model.safetensors",
         breaks=edit_header("model/model.safetensors", lambda h: h.update({first_tensor(h): "oops"}))),
    Case("doctor-tokenizer-json-is-a-list", "healer", ("doctor", "{model}"), 2, "tokenizer.json",
         breaks=write_file("model/tokenizer.json", "[1, 2]")),
    Case("doctor-generation-config-is-a-list", "healer", ("doctor", "{model}"), 2, "generation_config.json",
         breaks=write_file("model/generation_config.json", "[]")),
    Case("doctor-chat-template-is-a-number", "healer", ("doctor", "{model}"), 2, "tokenizer_config.json",
         breaks=edit_json("model/tokenizer_config.json", lambda t: t.update(chat_template=7))),
    Case("doctor-non-utf8-dir-name", "healer", ("doctor", "{work}/model-\udcff"), 1, "tokenizer",
         breaks=non_utf8_copy),
    Case("fix-non-utf8-dir-name", "healer", ("fix", "{work}/model-\udcff", "-o", "{out}"), 0, "Wrote",
         breaks=non_utf8_copy, writes=("out",)),
    Case("fix-unreadable-extra-file", "healer", (*FIX, "-o", "{out}"), 2, "notes.txt",
         breaks=dangling_link("model/notes.txt")),
    Case("fix-full-disk", "healer", (*FIX, "-o", "{out}"), 2, "No space left on device", disk="full"),
    Case("fix-read-only-output", "healer", (*FIX, "-o", "{out}"), 2, "not writable", disk="readonly"),
    Case("demo-full-disk", "healer", ("demo", "--out", "{out}", "--size", "tiny", "--device", "cpu"), 2,
         "No space left on device", disk="full", writes=("disk/out",)),
    Case("run-full-disk", "trainer", (*RUN, "--out", "{out}"), 2, "No space left on device", disk="full",
         writes=("disk/out",)),
    Case("run-read-only-output", "trainer", (*RUN, "--out", "{out}"), 2, "Read-only file system", disk="readonly"),
    Case("run-full-disk-checkpoint", "trainer", (*RUN, "--out", "{out}", "--save-steps", "1"), 2,
         "No space left on device", disk="full", writes=("disk/out",)),
    Case("export-full-disk", "trainer", (*EXPORT, "-o", "{out}"), 2, "No space left on device", disk="full"),
    Case("export-gguf-full-disk", "trainer", (*EXPORT, "--format", "gguf", "-o", "{out}"), 2,
         "No space left on device", disk="full"),
    Case("export-read-only-output", "trainer", (*EXPORT, "--format", "gguf", "-o", "{out}"), 2,
         "Read-only file system", disk="readonly"),
    Case("export-alpha-is-a-string", "trainer", (*EXPORT, "-o", "{out}"), 2, "lora_alpha",
         breaks=adapter_config(lambda c: c.update(lora_alpha="16"))),
    Case("export-rank-zero", "trainer", (*EXPORT, "-o", "{out}"), 2, "adapter_config.json",
         breaks=adapter_config(lambda c: c.update(r=0))),
    Case("export-one-dim-lora-a", "trainer", (*EXPORT, "-o", "{out}"), 2, "lora_A", breaks=edit_header("run/adapter/adapter_model.safetensors", flatten_lora_a)),
    Case("export-bad-alpha-pattern", "trainer", (*EXPORT, "-o", "{out}"), 2, "alpha_pattern",
         breaks=adapter_config(lambda c: c.update(alpha_pattern={"q_proj(": 4}))),
    Case("export-no-num-hidden-layers", "trainer", (*EXPORT, "--format", "gguf", "-o", "{out}"), 2,
         "num_hidden_layers", breaks=edit_json("model/config.json", lambda c: c.pop("num_hidden_layers"))),
    Case("export-f8-tensor", "trainer", (*EXPORT, "-o", "{out}"), 2, "F8_E4M3",
         breaks=edit_header("model/model.safetensors", f8_tensor)),
    Case("run-no-num-hidden-layers", "trainer", (*RUN, "--out", "{out}"), 2, "num_hidden_layers",
         breaks=edit_json("model/config.json", lambda c: c.pop("num_hidden_layers"))),
    # 4. hangs
    Case("doctor-template-nested-loops", "healer", ("doctor", "{model}"), 1, "template.render_error",
         breaks=template_file(TEMPLATE_LOOP)),
    Case("run-template-file-nested-loops", "trainer", (*RUN[:5], "--out", "{out}", "--template", "{work}/t.jinja",
                                                      *TRAIN[2:]), 2, "t.jinja' cannot render this conversation",
         breaks=write_file("t.jinja", TEMPLATE_LOOP)),
    Case("doctor-template-10gb-string", "healer", ("doctor", "{model}"), 1, "template.render_error",
         breaks=template_file(TEMPLATE_10GB)),
    # 5. messages that say what is wrong
    Case("run-empty-data-file", "trainer", (*RUN[:4], "{work}/empty.jsonl", *TRAIN, "--out", "{out}"), 2,
         "empty.jsonl: the data file is empty", breaks=write_file("empty.jsonl", "")),
    Case("run-json-array-with-a-number", "trainer", (*RUN[:4], "{work}/chat.json", *TRAIN, "--out", "{out}"), 2,
         "chat.json record 1: expected a JSON object", breaks=not_json_array),
    Case("run-template-file-syntax-error", "trainer", (*RUN[:5], "--out", "{out}", "--template", "{work}/t.jinja",
                                                       *TRAIN[2:]), 2, "t.jinja", breaks=write_file("t.jinja", BAD_SYNTAX)),
    Case("run-template-file-not-utf8", "trainer", (*RUN[:5], "--out", "{out}", "--template", "{work}/t.jinja",
                                                   *TRAIN[2:]), 2, "t.jinja", breaks=write_file("t.jinja", b"\xff\xfe{{")),
    Case("run-preview-template-file-not-utf8", "trainer", (*RUN[:5], "--preview", "1", "--template",
                                                           "{work}/t.jinja"), 2, "t.jinja",
         breaks=write_file("t.jinja", b"\xff\xfe{{")),
    Case("doctor-template-jinja-not-utf8", "healer", ("doctor", "{model}"), 2, "chat_template.jinja",
         breaks=template_file(b"{{ messages }}\xff")),
    Case("doctor-template-jinja-syntax-error", "healer", ("doctor", "{model}"), 1, "chat_template.jinja",
         breaks=template_file(BAD_SYNTAX)),
    Case("doctor-tokenizer-json-without-added-tokens", "healer", ("doctor", "{model}"), 2, "tokenizer.json: needs",
         breaks=edit_json("model/tokenizer.json", lambda t: t.pop("added_tokens"))),
    Case("template-messages-not-json", "healer", ("template", "render", "chatml", "--messages", "{work}/m.json"), 2,
         "m.json: invalid JSON", breaks=write_file("m.json", "x{")),
    Case("template-messages-a-number", "healer", ("template", "render", "chatml", "--messages", "{work}/m.json"), 2,
         "m.json: expected a JSON object", breaks=write_file("m.json", "7")),
    Case("fix-dataset-empty", "healer", (*FIX, "-o", "{out}", "--dataset", "{work}/d.jsonl"), 2,
         "d.jsonl: the dataset holds no records", breaks=write_file("d.jsonl", "")),
    Case("fix-dataset-array-of-numbers", "healer", (*FIX, "-o", "{out}", "--dataset", "{work}/d.json"), 2,
         "d.json record 0", breaks=write_file("d.json", "[1, 2]")),
    Case("doctor-corpus-not-utf8", "healer", ("doctor", "{model}", "--corpus", "{work}/c.txt"), 2,
         "c.txt: corpus is not UTF-8", breaks=write_file("c.txt", b"\xff\xfe")),
    Case("demo-out-holds-other-files", "healer", ("demo", "--out", "{model}", "--size", "tiny", "--device", "cpu"), 2,
         "holds no earlier demo"),
    Case("run-resume-not-a-run", "trainer", ("run", "--resume", "{model}"), 2, "not a trainer run dir"),
    Case("export-no-adapter-weights", "trainer", (*EXPORT, "-o", "{out}"), 2, "no adapter_model.safetensors",
         breaks=remove("run/adapter/adapter_model.safetensors")),
    Case("fix-out-is-an-unrelated-file", "healer", (*FIX, "-o", "{data}"), 2, "exists and is not empty"),
    # 6. leftovers of killed runs are removed by the next run
    Case("fix-force-replaces-out-and-removes-stale-staging", "healer", (*FIX, "-o", "{out}", "--force"), 0, "Wrote",
         writes=("out",), stale=("out/old.txt", ".out.healer-{dead}/pass1/model.safetensors",
                                  ".out.healer-old-{dead}/x")),
    Case("export-removes-stale-gguf-tmp", "trainer", (*EXPORT, "--format", "gguf", "-o", "{out}.gguf"), 0, "Wrote",
         stale=(".out.gguf.tmp-{dead}",), writes=("out.gguf",)),
]


# ----------------------------------------------------------------------------- the invariants


def tree(root: Path) -> dict[str, tuple[str, int]]:
    """Every file and dir under root: relative path -> (sha256 or 'dir' or 'link', mode)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            if p.is_symlink():
                digest = "link:" + os.readlink(p)
            elif p.is_dir():
                digest = "dir"
            else:
                digest = hashlib.sha256(p.read_bytes()).hexdigest()
            out[os.fsdecode(p.relative_to(root))] = (digest, st.st_mode)
    return out


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def mount(tmp_path):
    """mount(size, readonly) -> a tmpfs dir inside tmp_path, unmounted afterwards; skips where not allowed."""
    mounted = []

    def do(kind: str) -> Path:
        d = tmp_path / "work" / "disk"
        d.mkdir(parents=True)
        opts = "ro,size=64k" if kind == "readonly" else "size=64k"
        if shutil.which("mount") is None:
            pytest.skip("no mount command here: full-disk and read-only cases need a small tmpfs")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): "
                        f"full-disk and read-only cases need root")
        mounted.append(d)
        return d

    yield do
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], check=False)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_fault(case: Case, pristine: Path, tmp_path: Path, mount) -> None:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    for name in ("model", "chat.jsonl", "run"):
        src = pristine / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, work / name)
    # the copied run's adapter must name the copied base, not the pristine one
    edit_json("run/adapter/adapter_config.json",
              lambda c: c.update(base_model_name_or_path=str(work / "model")))(work)
    if case.breaks is not None:
        case.breaks(work)
    out = work / "out"
    if case.disk is not None:
        out = mount(case.disk) / "out"
    before = tree(work)
    dead = dead_pid()
    for rel in case.stale:
        p = work / rel.format(dead=dead)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("left by a killed run")
    fill = {"model": work / "model", "data": work / "chat.jsonl", "run": work / "run", "work": work, "out": out}
    args = [a.format(**fill) for a in case.args]
    group = cli.healer if case.command == "healer" else cli.trainer

    started = time.monotonic()
    result = CliRunner().invoke(group, args)
    elapsed = time.monotonic() - started

    said = result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        "traceback:\n" + "".join(__import__("traceback").format_exception(result.exception)))
    assert "Traceback" not in said
    assert result.exit_code == case.code, said[-2000:]
    if case.code == 2:  # one line, the last: progress a run printed before it failed may come first
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert lines[-1].startswith("error: ") and sum(line.startswith("error") for line in lines) == 1, said
    assert case.fragment in (result.stderr if case.code == 2 else said), said[-2000:]
    assert elapsed < CASE_SECONDS

    kept = [rel for rel in case.stale if os.path.lexists(work / rel.format(dead=dead))]
    assert kept == [], f"should be gone: {kept}"
    after = tree(work)
    allowed = tuple(case.writes)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k)
                     and not any(k == w or k.startswith(w + "/") for w in allowed))
    assert changed == [], f"changed, removed or new outside OUT: {changed}"
    staging = [k for k in after if any(t in Path(k).name for t in (".healer-", ".tmp-", ".old-"))]
    assert staging == [], f"staging leftovers: {staging}"


def test_cpu_nf4_run_prints_no_hub_lookup_noise(pristine: Path, tmp_path: Path) -> None:
    """bitsandbytes' import asked the Hub for a CPU kernel and printed its failure on every CPU NF4 run."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    cmd = [sys.executable, "-m", "trainer", "run", "--model", str(pristine / "model"), "--data",
           str(pristine / "chat.jsonl"), "--out", str(tmp_path / "run"), *TRAIN[:-1]]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gemm_4bit" not in proc.stderr and "kernels-community" not in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "finished"


def test_a_failed_run_is_marked_failed_and_needs_force(pristine: Path, tmp_path: Path, mount) -> None:
    disk = mount("full")
    args = ["run", "--model", str(pristine / "model"), "--data", str(pristine / "chat.jsonl"),
            "--out", str(disk / "run"), *TRAIN]
    first = CliRunner().invoke(cli.trainer, args)
    assert first.exit_code == 2 and "No space left on device" in first.stderr
    record = json.loads((disk / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "No space left" in record["error"]
    again = CliRunner().invoke(cli.trainer, args)
    assert again.exit_code == 2 and "holds an earlier run (failed)" in again.stderr


def test_debug_shows_the_traceback_that_is_otherwise_one_line(pristine: Path, tmp_path: Path) -> None:
    from healer.errors import CheckpointError

    model = shutil.copytree(pristine / "model", tmp_path / "model")
    (model / "tokenizer.json").write_text("[1, 2]")
    quiet = CliRunner().invoke(cli.healer, ["doctor", str(model)])
    assert quiet.exit_code == 2 and isinstance(quiet.exception, SystemExit) and "Traceback" not in quiet.output
    loud = CliRunner().invoke(cli.healer, ["--debug", "doctor", str(model)])
    assert isinstance(loud.exception, CheckpointError) and "tokenizer.json" in str(loud.exception)
