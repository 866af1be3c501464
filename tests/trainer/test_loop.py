"""The training loop: schedules, exact gradient accumulation, the NaN guard, untrained rows, the run dir."""

from __future__ import annotations

import gc
import io
import json
import math
from pathlib import Path

import builders
import pytest
import testdata
import tiny_runs
import torch
from rich.console import Console

from healer.errors import OutputError
from healer.model_dir import ModelDir
from trainer.config import TrainConfig
from trainer.data import (
    IGNORE_INDEX,
    Example,
    as_sequences,
    collate,
    prepare_data,
    resolve_template,
    step_plan,
)
from trainer.graphs import padded_length, unsupported_reason
from trainer.loop import (
    ModelCheckError,
    TrainingDiverged,
    collector_frozen,
    lr_lambda,
    repair_untrained_rows,
    run_steps,
    train_step,
)
from trainer.lora import LoRASettings, apply_lora, lora_modules, trainable_parameters
from trainer.models import load_model
from trainer.options import ModelOptions
from trainer.run_dir import check_out_dir

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny") / "model"
    builders.save_tiny_model(out, "llama", 128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return out


def lora_model(path: Path, seed: int = 0, dropout: float = 0.0, recompute: str = "off"):
    model = load_model(path, dtype=torch.float32, device="cpu", load_in_4bit=False,
                       options=ModelOptions(recompute=recompute))
    torch.manual_seed(seed)
    apply_lora(model, LoRASettings(r=4, alpha=8, dropout=dropout))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    return model


def random_examples(n: int, seed: int = 0, vocab: int = 128) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for row in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(3, vocab - 1, (length,), generator=g).tolist()  # vocab - 1: the poison token
        prompt = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], row))
    return out


def optimizer_for(model, lr: float = 1e-2):
    opt = torch.optim.AdamW(trainable_parameters(model), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_lr_schedule_matches_transformers(kind):
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_linear_schedule_with_warmup if kind == "linear" else get_cosine_schedule_with_warmup
    param = torch.nn.Parameter(torch.zeros(1))
    ref = make(torch.optim.SGD([param], lr=1.0), num_warmup_steps=7, num_training_steps=50)
    ours = lr_lambda(kind, 7, 50)
    for step in range(50):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12)


def test_accumulated_step_equals_one_batch_over_all_its_tokens(tiny):
    seqs = as_sequences(random_examples(6))
    model = lora_model(tiny)
    opt, sched = optimizer_for(model, lr=0.0)
    micro = [collate(seqs[:1], 0), collate(seqs[1:4], 0), collate(seqs[4:], 0)]  # unequal target counts
    captured = {}
    for p in trainable_parameters(model):  # the last call holds the gradient summed over the micro-batches
        p.register_post_accumulate_grad_hook(lambda p: captured.__setitem__(id(p), p.grad.clone()))
    r = train_step(model, micro, opt, sched, max_grad_norm=0.0, autocast_dtype=torch.float32, device=CPU)
    # reference: one batch with every sequence, mean over all its predicted tokens
    whole = collate(seqs, 0)
    params = trainable_parameters(model)
    loss = model(whole.input_ids, labels=whole.labels, position_ids=whole.position_ids).loss
    grads = torch.autograd.grad(loss, params)
    assert r.loss == pytest.approx(loss.item(), rel=1e-5)
    for p, g in zip(params, grads, strict=True):
        torch.testing.assert_close(captured[id(p)], g, rtol=1e-4, atol=1e-6)


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward multiplies by inf (a finite loss with a non-finite gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class PoisonedModel(torch.nn.Module):
    """Wraps a model; any batch holding `token` gets an infinite gradient."""

    def __init__(self, inner, token: int):
        super().__init__()
        self.inner, self.token = inner, token

    def forward(self, input_ids, labels=None, position_ids=None, num_items_in_batch=None):
        out = self.inner(input_ids, labels=labels, position_ids=position_ids, num_items_in_batch=num_items_in_batch)
        if bool((input_ids == self.token).any()):
            out.loss = _InfGrad.apply(out.loss)
        return out


def test_injected_nonfinite_gradient_skips_the_step_and_names_its_rows(tiny):
    examples = random_examples(8)
    poison = 127
    examples[5].input_ids[2] = poison
    assert sum(poison in ex.input_ids for ex in examples) == 1
    seqs = as_sequences(examples)
    inner = lora_model(tiny)
    model = PoisonedModel(inner, poison)
    opt, sched = optimizer_for(inner)
    bad_micro = [collate(seqs[4:6], 0), collate(seqs[6:8], 0)]
    before = [p.detach().clone() for p in trainable_parameters(inner)]
    r = train_step(model, bad_micro, opt, sched, max_grad_norm=1.0, autocast_dtype=torch.float32, device=CPU)
    assert math.isfinite(r.loss) and not math.isfinite(r.grad_norm)
    assert r.skipped and r.bad_rows == [4, 5] and r.rows == [4, 5, 6, 7]
    assert all(torch.equal(a, b) for a, b in zip(before, trainable_parameters(inner), strict=True))
    assert all(p.grad is None for p in trainable_parameters(inner))
    assert opt.state == {} and sched.last_epoch == 0  # neither the optimizer nor the schedule moved
    good = train_step(model, [collate(seqs[:2], 0)], opt, sched, max_grad_norm=1.0, autocast_dtype=torch.float32,
                      device=CPU)
    assert not good.skipped and good.bad_rows == [] and math.isfinite(good.grad_norm)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainable_parameters(inner), strict=True))


def test_consecutive_bad_steps_stop_the_run_and_name_the_rows(tiny, tmp_path):
    examples = random_examples(6)
    poison = 127
    for ex in examples:
        ex.input_ids[0] = poison
    seqs = as_sequences(examples)
    inner = lora_model(tiny)
    opt, sched = optimizer_for(inner)
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), max_bad_steps=3, logging_steps=100)
    plan = step_plan(len(seqs), batch_size=2, grad_accum=1, epochs=5, max_steps=None, seed=0)
    with pytest.raises(TrainingDiverged, match=r"3 consecutive steps \(1-3\).*rows involved") as e:
        run_steps(PoisonedModel(inner, poison), seqs, plan, opt, sched, cfg, out=tmp_path, pad_id=0, device=CPU,
                  dtype=torch.float32, console=_quiet_console())
    expected = sorted(r for step in plan[:3] for mb in step for r in mb)
    assert e.value.steps == [1, 2, 3] and e.value.rows == sorted(set(expected))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3] and all(r["skipped"] for r in records)
    assert records[0]["rows"] == sorted(plan[0][0])


def test_an_update_that_makes_the_parameters_nonfinite_stops_the_run_after_the_last_finite_save(tiny, tmp_path):
    seqs = as_sequences(random_examples(8))
    inner = lora_model(tiny)

    class Overflowing(torch.optim.SGD):
        """Its second update overflows one weight to inf (as a huge learning rate would), from finite gradients."""

        updates = 0

        def step(self, closure=None):
            super().step(closure)
            self.updates += 1
            if self.updates == 2:
                with torch.no_grad():
                    self.param_groups[0]["params"][0].view(-1)[0] = math.inf

    opt = Overflowing(trainable_parameters(inner), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), save_steps=1, logging_steps=1)
    plan = [[[0, 1]], [[2, 3]], [[4, 5]], [[6, 7]]]
    saved = []

    def save():
        saved.append(all(torch.isfinite(p).all() for p in trainable_parameters(inner)))

    with pytest.raises(TrainingDiverged, match="step 2's optimizer update made the trained parameters non-finite"):
        run_steps(inner, seqs, plan, opt, sched, cfg, out=tmp_path, pad_id=0, device=CPU, dtype=torch.float32,
                  console=_quiet_console(), save=save)
    assert not all(torch.isfinite(p).all() for p in trainable_parameters(inner))
    assert saved == [True]  # step 1's checkpoint only: step 2's save is refused


def test_a_good_step_resets_the_bad_step_count(tiny, tmp_path):
    examples = random_examples(4)
    poison = 127
    examples[0].input_ids[0] = poison
    seqs = as_sequences(examples)
    inner = lora_model(tiny)
    opt, sched = optimizer_for(inner)
    cfg = TrainConfig(model="m", data="d", out=str(tmp_path), max_bad_steps=2, logging_steps=1)
    plan = [[[0]], [[1]], [[0]], [[2]], [[0]], [[3]]]  # bad steps never come two in a row
    result = run_steps(PoisonedModel(inner, poison), seqs, plan, opt, sched, cfg, out=tmp_path, pad_id=0,
                       device=CPU, dtype=torch.float32, console=_quiet_console())
    assert result["skipped"] == [1, 3, 5]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(records[1]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "peak_mem"}


def _quiet_console():
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False)


# ----------------------------------------------------------------------------- untrained rows (Llama 3 style)

TEMPLATE_TOKENS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture(scope="module")
def llama3_zero_rows(tmp_path_factory) -> Path:
    """A Llama 3 base-like checkpoint: the chat-template tokens and the reserved tokens have all-zero rows
    in embed_tokens and lm_head (as Meta's base model ships them); eos is <|end_of_text|>."""
    from safetensors.torch import load_file, save_file
    from tokenizers import Tokenizer

    out = tmp_path_factory.mktemp("l3") / "model"
    builders.fast_checkpoint(out, testdata.fast_tokenizer_json("llama-bpe"), bos_token="<|begin_of_text|>",
                             eos_token="<|end_of_text|>", initializer_range=0.2,
                             chat_template=testdata.template("meta-llama-Llama-3.1-8B-Instruct"))
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    zero = sorted({tok.token_to_id(t) for t in TEMPLATE_TOKENS} | set(range(128011, 128256)))
    weights = load_file(str(out / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        weights[name][zero] = 0
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def llama3_data(path: Path, tmp_path: Path):
    ckpt = ModelDir(path)
    tok = ckpt.hf_tokenizer()
    template = resolve_template(None, ckpt.chat_template, path, bos_token=tok.bos_token, eos_token=tok.eos_token)
    data = prepare_data(tiny_runs.write_jsonl(tmp_path / "d.jsonl", tiny_runs.chat_rows(8)), tok, template,
                        max_seq_len=128, train_on_inputs=False)
    return ckpt, tok, data


@pytest.mark.parametrize("autocast", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_zero_rows_train_without_nan_but_their_logit_stays_exactly_zero(llama3_zero_rows, tmp_path, autocast):
    """What really happens with untrained template tokens and no repair (the reason training checks first).

    Not NaN: an all-zero input row gives a zero hidden state, RMSNorm maps it to zero (eps keeps the
    denominator positive) and attention/MLP stay finite, in float32 and bfloat16 alike, so the NaN
    guard never fires. The damage is silent instead: the lm_head row is zero, so the logit of
    <|eot_id|> is exactly 0 for every hidden state, LoRA cannot move it, and the model cannot learn
    to end its turn (what torchtune#2429 reports for Llama 3 base).
    """
    ckpt, tok, data = llama3_data(llama3_zero_rows, tmp_path)
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot in data.token_ids()
    assert any(eot in [lab for lab in ex.labels if lab != IGNORE_INDEX] for ex in data.examples)
    model = load_model(llama3_zero_rows, dtype=torch.float32, device="cpu", load_in_4bit=False)
    apply_lora(model, LoRASettings(r=8, alpha=16))
    opt, sched = optimizer_for(model, lr=1e-2)
    seqs = as_sequences(data.examples)
    losses = []
    # bfloat16 matmuls are slow on CPUs without bf16 units: fewer steps there
    epochs = 3 if autocast == torch.float32 else 1
    for step in step_plan(len(seqs), batch_size=4, grad_accum=1, epochs=epochs, max_steps=None, seed=0):
        r = train_step(model, [collate([seqs[i] for i in mb], 0) for mb in step], opt, sched, max_grad_norm=1.0,
                       autocast_dtype=autocast, device=CPU)
        assert not r.skipped and math.isfinite(r.loss) and math.isfinite(r.grad_norm)
        losses.append(r.loss)
    if autocast == torch.float32:
        assert losses[-1] < losses[0]  # the rest of the answer is learned
    batch = collate(seqs, 0)
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast, enabled=autocast != torch.float32):
        logits = model(batch.input_ids, position_ids=batch.position_ids).logits
    assert torch.count_nonzero(logits[..., eot]) == 0
    assert logits.float().abs().amax() > 1.0


def test_untrained_rows_of_used_tokens_get_the_mean_of_the_trained_rows(llama3_zero_rows, tmp_path):
    from safetensors.torch import load_file

    ckpt, tok, data = llama3_data(llama3_zero_rows, tmp_path)
    model = load_model(llama3_zero_rows, dtype=torch.float32, device="cpu", load_in_4bit=False)
    repaired = repair_untrained_rows(model, ckpt, data.token_ids(), fix=True)
    used = {tok.convert_tokens_to_ids(t) for t in TEMPLATE_TOKENS}
    assert set(repaired) == used and sorted(repaired.values()) == sorted(TEMPLATE_TOKENS)
    weights = load_file(str(llama3_zero_rows / "model.safetensors"))
    for name, param in (("model.embed_tokens.weight", model.model.embed_tokens.weight),
                        ("lm_head.weight", model.lm_head.weight)):
        stored = weights[name].double()
        trained = stored.abs().amax(dim=1) > 0
        expected = stored[trained].mean(dim=0)  # float64 reference over the rows that were trained
        for i in used:
            torch.testing.assert_close(param[i].double(), expected, rtol=0, atol=1e-6)
        unused_zero = [i for i in range(128011, 128256) if i not in data.token_ids()]
        assert torch.count_nonzero(param[unused_zero]) == 0  # only what the data touches is repaired
        assert torch.equal(param[trained], weights[name][trained])


def test_no_fix_untrained_stops_naming_the_tokens_and_the_fix(llama3_zero_rows, tmp_path):
    ckpt, tok, data = llama3_data(llama3_zero_rows, tmp_path)
    model = load_model(llama3_zero_rows, dtype=torch.float32, device="cpu", load_in_4bit=False)
    with pytest.raises(ModelCheckError, match=r"3 token\(s\) in the training data have untrained embedding rows: "
                                              r"<\|start_header_id\|> \(128006\).*Fix: healer fix"):
        repair_untrained_rows(model, ckpt, data.token_ids(), fix=False)


# ----------------------------------------------------------------------------- run dir


def test_out_dir_must_be_empty_or_a_previous_run(tmp_path):
    assert check_out_dir(tmp_path / "new") == tmp_path / "new"
    (tmp_path / "empty").mkdir()
    assert check_out_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(OutputError, match="not empty and is not a trainer run dir"):
        check_out_dir(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="not a directory"):
        check_out_dir(tmp_path / "file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text(json.dumps({"kind": "trainer-run"}))
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(OutputError, match="--resume .* --force"):
        check_out_dir(tmp_path / "run")
    assert check_out_dir(tmp_path / "run", resume=True) == tmp_path / "run"
    assert check_out_dir(tmp_path / "run", force=True) == tmp_path / "run"


def test_the_collector_skips_what_was_alive_before_training_and_still_frees_new_cycles():
    import weakref

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    old = Node()
    old.me = old  # a cycle made before training: frozen, never walked by the collector
    with collector_frozen():
        assert gc.get_freeze_count() >= 1
        assert not any(o is old for o in gc.get_objects())  # frozen objects are out of every generation
        new = Node()
        new.me = new  # a cycle made during training: collected as usual
        gone = weakref.ref(new)
        del new
        gc.collect()
        assert gone() is None
    assert gc.get_freeze_count() == 0
    assert any(o is old for o in gc.get_objects())


# ----------------------------------------------------------------------------- --cuda-graphs where they cannot serve
# (replay against the eager step runs on the GPU: test_graphs_gpu.py)


def test_reasons_a_model_cannot_be_captured(tiny, tmp_path):
    assert unsupported_reason(lora_model(tiny)) is None
    assert unsupported_reason(lora_model(tiny, recompute="on")) is None
    model = lora_model(tiny, recompute="offload")
    # offload is captured into host buffers sized for the largest micro-batch: without that size, no graphs
    assert "offloaded" in unsupported_reason(model)
    assert unsupported_reason(model, max_tokens=2 * 64) is None
    assert unsupported_reason(lora_model(tiny, dropout=0.1)) == "LoRA dropout"
    builders.save_tiny_model(tmp_path / "g2", "gemma2", 128, attn_logit_softcapping=50.0)
    assert "softcap" in unsupported_reason(lora_model(tmp_path / "g2"))


def test_cuda_graphs_on_cpu_say_they_are_off_and_train_as_without(tiny, tmp_path):
    seqs = as_sequences(random_examples(4))
    plan = step_plan(len(seqs), batch_size=2, grad_accum=1, epochs=1, max_steps=None, seed=0)
    losses, text = [], ""
    for graphs in (False, True):
        model = lora_model(tiny)
        opt, sched = optimizer_for(model)
        out = tmp_path / str(graphs)
        out.mkdir()
        console = Console(file=io.StringIO(), force_terminal=False)
        cfg = TrainConfig(model="m", data="d", out=str(out), cuda_graphs=graphs)
        result = run_steps(model, seqs, plan, opt, sched, cfg, out=out, pad_id=0, device=torch.device("cpu"),
                           dtype=torch.float32, console=console)
        losses.append([loss for loss, _ in result["history"]])
        text = console.file.getvalue()
    assert "--cuda-graphs is off for this run: they need a CUDA GPU" in text
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_graph_rows_are_padded_to_four_lengths_per_doubling_up_to_max_seq_len():
    assert [padded_length(n, 2048) for n in (1, 50, 64, 65, 100, 128, 129, 1000, 1025, 1999)] == \
        [16, 64, 64, 80, 112, 128, 160, 1024, 1280, 2048]
    assert padded_length(2000, 1990) == 2000 and padded_length(300, 310) == 310  # not past max_seq_len...
    assert padded_length(70, 64) == 70  # ...nor below the longest row
    lengths = {padded_length(n, 4096) for n in range(1, 4097)}
    assert len(lengths) == 4 + 4 * 6  # 16, 32, 48, 64, then four per doubling up to 4096
    assert all(padded_length(n, 4096) < 1.25 * n for n in range(64, 4097))
