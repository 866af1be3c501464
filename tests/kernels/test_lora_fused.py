"""LoRA-fused projections and MLP (trainer/kernels/lora_fused.py) against float64 math and against the
plain path they replace (LoRALinear's base(x) + lora_delta, the decoder's MLP composition).

16-bit and NF4 bases (bitsandbytes dequantizes on CPU in this install), float32 and bf16 autocast,
odd sizes. The bf16 checks are norm-wise: each output and gradient must be within a bf16 rounding or
two of the float64 value computed from the same bf16-rounded operands, and no further from it than
the plain path is (both round intermediates; the fused path rounds fewer of them).
"""

import contextlib
from pathlib import Path

import builders
import pytest
import torch
from kernel_checks import (
    assert_close,
    dequantized_4bit,
    device,
    kernels_off,
    kernels_on,
    relative_error,
    seed,
)
from torch import nn

from trainer.data import IGNORE_INDEX
from trainer.kernels.lora_fused import (
    cached_factor_casts,
    clear_workspaces,
    dense_weight,
    gated_backward_in_place,
    gated_lora_activation,
    lora_linear,
    lora_mlp,
    lora_projections,
)
from trainer.kernels.rope import apply_rope, rotatable_in_place
from trainer.lora import (
    LoRALinear,
    LoRASettings,
    apply_lora,
    fp8_layers,
    lora_modules,
    mlp_uses_kernel,
)
from trainer.models import load_model, ops
from trainer.options import DEFAULT_OPTIONS, ModelOptions

pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

BF16_BOUND = 2.0**-7  # norm-wise relative error allowed against float64 in bf16 (one rounding is 2**-9)

# How the model's weights and the forward are set up: (weights dtype, autocast dtype or None)
MODES = {"fp32": (torch.float32, None), "fp32+autocast": (torch.float32, torch.bfloat16),
         "bf16+autocast": (torch.bfloat16, torch.bfloat16)}


def nf4_linear(linear: nn.Linear, compute_dtype: torch.dtype) -> nn.Module:
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=True)
    q.weight = bnb.nn.Params4bit(linear.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                 compress_statistics=True)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return q.to(linear.weight.device)


def base_linear(n_in: int, n_out: int, kind: str, dtype: torch.dtype, bias: bool = False) -> nn.Module:
    """A frozen nn.Linear, or a Linear4bit quantized from it (as trainer.models.load_model does)."""
    with torch.device(device()):
        lin = nn.Linear(n_in, n_out, bias=bias, dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, n_in**-0.5)
        if bias:
            lin.bias.normal_(0, 0.1)
    lin.requires_grad_(False)
    return lin if kind == "linear" else nf4_linear(lin, dtype)


def adapted(base: nn.Module, r: int = 8, alpha: float = 12.0, options: ModelOptions = DEFAULT_OPTIONS) -> LoRALinear:
    """LoRALinear with B nonzero (a fresh B = 0 would hide every LoRA error in the output)."""
    m = LoRALinear(base, r, alpha, options=options)
    with torch.no_grad():
        m.lora_B.weight.normal_(0, r**-0.5)
    return m


def twin(m: nn.Module, options: ModelOptions) -> nn.Module:
    """A LoRALinear built with `options` over m's base layer and m's own LoRA factors, so gradients reach m's;
    m itself where it is not a LoRALinear (a frozen base)."""
    return m.rebuilt(options) if isinstance(m, LoRALinear) else m


def weight64(base: nn.Module, rounded_to: torch.dtype | None) -> torch.Tensor:
    """The base weight as the product sees it (4-bit: decoded as the format defines it, rounded to the
    compute dtype)."""
    w = base.weight
    if getattr(w, "quant_state", None) is not None:
        w = dequantized_4bit(w, w.quant_state)
    return (w if rounded_to is None else w.to(rounded_to)).double()


def _r(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """t rounded to dtype (as autocast rounds an operand), then float64 with grad."""
    t = t.detach()
    return (t if dtype is None else t.to(dtype)).double().requires_grad_()


def linear64(x: torch.Tensor, m: LoRALinear, rounded_to: torch.dtype | None) -> torch.Tensor:
    """base(x) + s x A^T B^T in float64 from the operands rounded as the products see them."""
    b = m.base_layer.bias
    y = x @ weight64(m.base_layer, rounded_to).t() + (0 if b is None else _r(b, rounded_to).detach())
    return y + (x @ m.A64.t()) @ m.B64.t() * m.scaling


def check(actual: list[torch.Tensor], plain: list[torch.Tensor], ref: list[torch.Tensor], names: list[str],
          autocast: torch.dtype | None) -> None:
    for a, p, e, name in zip(actual, plain, ref, names):
        assert a.dtype == p.dtype, (name, a.dtype, p.dtype)
        if autocast is None:
            assert_close(a, e, torch.float32, name, rtol=1e-4)  # float32 sums of up to 160 terms
            continue
        err, plain_err = relative_error(a, e), relative_error(p, e)
        assert err <= BF16_BOUND, (name, err)
        assert err <= 1.25 * plain_err + 1e-4, (name, err, plain_err)


def run(fn, inputs: list[torch.Tensor], dy: torch.Tensor, autocast: torch.dtype | None) -> list[torch.Tensor]:
    with torch.autocast(device().type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        y = fn()
    return [y.detach(), *torch.autograd.grad(y, inputs, dy.to(y.dtype))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("lead", [(37,), (2, 7)], ids=["37", "2x7"])
def test_lora_linear_matches_float64_and_the_plain_path(lead, bias, kind, mode):
    torch.manual_seed(seed(lead, bias, kind, mode))
    dtype, autocast = MODES[mode]
    m = adapted(base_linear(96, 160, kind, dtype, bias))
    x = torch.randn(*lead, 96, device=device()).to(dtype).requires_grad_()
    dy = torch.randn(*lead, 160, device=device())
    params = [x, m.lora_A.weight, m.lora_B.weight]

    plain_path = run(lambda: twin(m, kernels_off())(x), params, dy, autocast)
    fused = run(lambda: lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling), params, dy,
                autocast)

    x64 = _r(x, autocast)
    m.A64, m.B64 = _r(m.lora_A.weight, autocast), _r(m.lora_B.weight, autocast)
    y64 = linear64(x64, m, autocast)
    ref = [y64.detach(), *torch.autograd.grad(y64, [x64, m.A64, m.B64], dy.double())]
    check(fused, plain_path, ref, ["y", "dx", "dA", "dB"], autocast)


@pytest.mark.parametrize("alphas", [(12.0, 12.0, 12.0), (12.0, 5.0, 20.0)], ids=["one-scale", "three-scales"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_lora_projections_match_float64_and_the_plain_path(bias, kind, mode, alphas):
    """q, k and v of one input (outputs 160, 48, 48) through lora_projections: one Function where every product
    runs in one dtype, three lora_linear calls where not (float32 weights under bf16 autocast), against
    LoRALinear's plain path and float64."""
    torch.manual_seed(seed(bias, kind, mode, alphas))
    dtype, autocast = MODES[mode]
    outs = (160, 48, 48)
    mods = [adapted(base_linear(96, n, kind, dtype, bias), alpha=alpha) for n, alpha in zip(outs, alphas)]
    x = torch.randn(2, 7, 96, device=device()).to(dtype).requires_grad_()
    dys = [torch.randn(2, 7, n, device=device()) for n in outs]
    params = [x] + [p for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]

    def outputs_and_grads(fn):
        with torch.autocast(device().type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            ys = fn()
        grads = torch.autograd.grad(ys, params, [dy.to(y.dtype) for dy, y in zip(dys, ys)])
        return [y.detach() for y in ys] + list(grads), {type(y.grad_fn).__name__ for y in ys}

    plain_path, _ = outputs_and_grads(lambda: [twin(m, kernels_off())(x) for m in mods])
    fused, nodes = outputs_and_grads(lambda: lora_projections(x, tuple(mods)))
    one_dtype = mode != "fp32+autocast"
    assert nodes == {"LoRAProjectionsFunctionBackward" if one_dtype else "LoRALinearFunctionBackward"}

    x64 = _r(x, autocast)
    for m in mods:
        m.A64, m.B64 = _r(m.lora_A.weight, autocast), _r(m.lora_B.weight, autocast)
    ys64 = [linear64(x64, m, autocast) for m in mods]
    leaves = [x64] + [t for m in mods for t in (m.A64, m.B64)]
    ref = [y.detach() for y in ys64] + list(torch.autograd.grad(ys64, leaves, [dy.double() for dy in dys]))
    names = ["q", "k", "v", "dx", "q.A", "q.B", "k.A", "k.B", "v.A", "v.B"]
    check(fused, plain_path, ref, names, autocast)


def test_lora_projections_save_x_its_stacked_lora_product_and_the_factors_only():
    torch.manual_seed(5)
    mods = tuple(adapted(base_linear(96, n, "nf4", torch.float32)) for n in (160, 48, 48))
    x = torch.randn(37, 96, device=device(), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_projections(x, mods)
    shapes = sorted(tuple(t.shape) for t in saved)
    factors = [(8, 96), (160, 8), (8, 96), (48, 8), (8, 96), (48, 8)]
    assert shapes == sorted([(37, 96), (37, 24), *factors]), shapes  # x, x [A_q; A_k; A_v]^T, the A's and B's


def test_lora_projections_stack_the_a_factors_once_per_cast_scope():
    """bf16 bases under bf16 autocast (the training setting): within one cached_factor_casts scope, two
    forward/backward passes make one stacked copy of the three A's and one copy of each B, and give the same
    outputs and gradients, bit for bit, as without the cache."""
    import trainer.kernels.lora_workspace as lora_workspace  # where the cache lives (a module global)

    torch.manual_seed(6)
    mods = tuple(adapted(base_linear(96, n, "linear", torch.bfloat16)) for n in (160, 48, 48))
    x = torch.randn(2, 7, 96, device=device(), dtype=torch.bfloat16, requires_grad=True)
    params = [x] + [p for m in mods for p in (m.lora_A.weight, m.lora_B.weight)]

    def two_passes(cached: bool):
        results, entries = [], None
        with cached_factor_casts() if cached else contextlib.nullcontext():
            for _ in range(2):
                with torch.autocast(device().type, dtype=torch.bfloat16):
                    ys = lora_projections(x, mods)
                assert type(ys[0].grad_fn).__name__ == "LoRAProjectionsFunctionBackward"
                results += [y.detach() for y in ys] + list(torch.autograd.grad([y.sum() for y in ys], params))
            if cached:
                entries = len(lora_workspace._CASTS)
        return results, entries

    cached, entries = two_passes(cached=True)
    assert entries == 1 + 3
    plain, _ = two_passes(cached=False)
    assert all(torch.equal(a, b) for a, b in zip(cached, plain))


def test_lora_linear_on_a_bf16_base_without_autocast_keeps_the_lora_product_in_float32():
    torch.manual_seed(3)
    m = adapted(base_linear(96, 160, "linear", torch.bfloat16))
    x = torch.randn(37, 96, device=device(), dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(37, 160, device=device())
    params = [x, m.lora_A.weight, m.lora_B.weight]
    plain = run(lambda: m(x), params, dy, None)
    fused = run(lambda: lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling), params, dy, None)
    assert [t.dtype for t in fused] == [torch.bfloat16, torch.bfloat16, torch.float32, torch.float32]
    # dA, dB: float32 products of bf16-exact operands (x, dy rounded), as in the plain path
    for name, a, p in zip(["y", "dx", "dA", "dB"], fused, plain):
        assert a.dtype == p.dtype
        assert relative_error(a, p) <= (2.0**-8 if a.dtype == torch.bfloat16 else 1e-6), name


def test_lora_linear_saves_neither_the_dense_weight_nor_the_output():
    torch.manual_seed(4)
    m = adapted(base_linear(96, 160, "nf4", torch.float32))
    x = torch.randn(37, 96, device=device(), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(37, 96), (8, 96), (160, 8), (37, 8)]), shapes  # x, A, B, x A^T


def test_dense_weights_of_all_nf4_layers_share_one_workspace():
    clear_workspaces()
    small = base_linear(96, 64, "nf4", torch.float32)
    large = base_linear(96, 160, "nf4", torch.float32)
    w_large = dense_weight(large, torch.float32)
    ptr = w_large.data_ptr()
    w_small = dense_weight(small, torch.float32)
    assert w_small.data_ptr() == ptr
    w_large = dense_weight(large, torch.float32)
    assert w_large.data_ptr() == ptr
    torch.testing.assert_close(w_large, dequantized_4bit(large.weight, large.weight.quant_state), rtol=0, atol=0)


def test_lora_linear_routes_to_the_fused_function_only_without_dropout():
    x = torch.randn(3, 96, device=device())
    m = adapted(base_linear(96, 64, "linear", torch.float32), options=kernels_on())
    assert m.uses_kernel(x) and type(m(x).grad_fn).__name__ == "LoRALinearFunctionBackward"
    assert not twin(m, kernels_off()).uses_kernel(x) and type(twin(m, kernels_off())(x).grad_fn).__name__ == "AddBackward0"
    assert twin(m, ModelOptions()).uses_kernel(x) == x.is_cuda  # by default: on CUDA
    assert repr(kernels_on()) in repr(m)
    dropped = LoRALinear(base_linear(96, 64, "linear", torch.float32), 8, 16, dropout=0.1, options=kernels_on())
    assert not dropped.uses_kernel(x)


@pytest.mark.parametrize("kind", ["linear", "nf4"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_fused_q_and_k_projections_are_rotated_in_place_by_rope(bias, kind):
    """lora_linear returns a tensor of its own, not a view (autograd forbids modifying a view a custom
    Function returned), so the RoPE kernel rotates it in place; values and gradients equal LoRALinear's plain
    path followed by the plain rotation."""
    torch.manual_seed(seed(bias, kind))
    heads, kv_heads, head_dim = 4, 2, 16
    # hidden 128: rows a whole number of NF4 blocks, where bitsandbytes' CPU kernel (the plain path) is right
    # on every CPU (see kernel_checks.dequantized_4bit)
    q_proj = adapted(base_linear(128, heads * head_dim, kind, torch.float32, bias))
    k_proj = adapted(base_linear(128, kv_heads * head_dim, kind, torch.float32, bias))
    x = torch.randn(2, 7, 128, device=device(), requires_grad=True)
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    cos, sin = ops.rope_tables(torch.arange(7, device=device()).expand(2, 7), inv_freq)
    dq, dk = torch.randn(2, 7, heads * head_dim, device=device()), torch.randn(2, 7, kv_heads * head_dim, device=device())
    params = [x] + [p for m in (q_proj, k_proj) for p in (m.lora_A.weight, m.lora_B.weight)]

    # the plain projections and the plain rotation (ops.apply_rope without the kernel)
    q_ref, k_ref = ops.apply_rope(twin(q_proj, kernels_off())(x), twin(k_proj, kernels_off())(x), cos, sin, head_dim)
    ref = [q_ref.detach(), k_ref.detach(), *torch.autograd.grad((q_ref, k_ref), params, (dq, dk))]

    q, k = twin(q_proj, kernels_on())(x), twin(k_proj, kernels_on())(x)
    assert type(q.grad_fn).__name__ == type(k.grad_fn).__name__ == "LoRALinearFunctionBackward"
    assert rotatable_in_place(q) and rotatable_in_place(k)
    ptrs = q.data_ptr(), k.data_ptr()
    q_rot, k_rot = apply_rope(q, k, cos, sin, head_dim)
    assert (q_rot.data_ptr(), k_rot.data_ptr()) == ptrs
    assert type(q_rot.grad_fn).__name__ == "RopeFunctionBackward"
    fused = [q_rot.detach(), k_rot.detach(), *torch.autograd.grad((q_rot, k_rot), params, (dq, dk))]
    for name, got, want in zip(["q", "k", "dx", "q.A", "q.B", "k.A", "k.B"], fused, ref):
        assert_close(got, want, torch.float32, name, rtol=1e-4)  # float32 sums, in another order


def mlp_modules(kind: str, dtype: torch.dtype, fused_gate_up: bool, adapt_up: bool, hidden: int = 96,
                inter: int = 160, r: int = 8) -> tuple[nn.Module, nn.Module | None, nn.Module]:
    down = adapted(base_linear(inter, hidden, kind, dtype), r)
    if fused_gate_up:
        return adapted(base_linear(hidden, 2 * inter, kind, dtype), r), None, down
    up = base_linear(hidden, inter, kind, dtype)
    return adapted(base_linear(hidden, inter, kind, dtype), r), adapted(up, r) if adapt_up else up, down


def plain_mlp(x, gate, up, down, activation):
    gate, up, down = (None if m is None else twin(m, kernels_off()) for m in (gate, up, down))
    g, u = gate(x).chunk(2, dim=-1) if up is None else (gate(x), up(x))
    return down(ops.gated_activation(g, u, activation))


def mlp64(x64, gate, up, down, activation, autocast):
    def proj(t, m):
        if not isinstance(m, LoRALinear):
            return t @ weight64(m, autocast).t()
        return linear64(t, m, autocast)

    g, u = proj(x64, gate).chunk(2, dim=-1) if up is None else (proj(x64, gate), proj(x64, up))
    return proj(ops.gated_activation(g, u, activation), down)


MLP_BASES = {  # (base kind, Phi-3 fused gate_up, up adapted)
    "linear": ("linear", False, True), "nf4": ("nf4", False, True),
    "up-not-adapted": ("linear", False, False), "phi3-gate-up": ("linear", True, True),
}
MLP_CASES = [  # (activation, base, mode, recompute): every base and mode with SwiGLU, each activation once
    *[("silu", base, "fp32", True) for base in MLP_BASES],
    ("silu", "linear", "fp32+autocast", True), ("silu", "linear", "bf16+autocast", True),
    ("silu", "nf4", "bf16+autocast", True), ("silu", "phi3-gate-up", "bf16+autocast", True),
    ("silu", "linear", "fp32", False), ("silu", "nf4", "bf16+autocast", False),
    ("gelu_tanh", "linear", "fp32", True), ("gelu_tanh", "linear", "bf16+autocast", True),
    ("gelu", "linear", "fp32", True),
]


@pytest.mark.parametrize("activation,case,mode,recompute", MLP_CASES, ids=lambda v: str(v).lower())
def test_lora_mlp_matches_float64_and_the_plain_path(activation, case, mode, recompute):
    torch.manual_seed(seed(activation, case, mode, recompute))
    kind, fused_gate_up, adapt_up = MLP_BASES[case]
    dtype, autocast = MODES[mode]
    gate, up, down = mlp_modules(kind, dtype, fused_gate_up, adapt_up)
    x = torch.randn(37, 96, device=device()).to(dtype).requires_grad_()
    dy = torch.randn(37, 96, device=device())
    loras = [m for m in (gate, up, down) if isinstance(m, LoRALinear)]
    params = [x] + [p for m in loras for p in (m.lora_A.weight, m.lora_B.weight)]

    plain = run(lambda: plain_mlp(x, gate, up, down, activation), params, dy, autocast)
    fused = run(lambda: lora_mlp(x, gate, up, down, activation, recompute=recompute), params, dy, autocast)

    x64 = _r(x, autocast)
    for m in loras:
        m.A64, m.B64 = _r(m.lora_A.weight, autocast), _r(m.lora_B.weight, autocast)
    y64 = mlp64(x64, gate, up, down, activation, autocast)
    ref = [y64.detach(), *torch.autograd.grad(y64, [x64] + [t for m in loras for t in (m.A64, m.B64)], dy.double())]
    names = ["y", "dx"] + [f"{n}.{ab}" for m, n in zip(loras, ["first", "second", "third"]) for ab in "AB"]
    check(fused, plain, ref, names, autocast)


def test_lora_mlp_keeps_no_intermediate_activation_for_backward():
    torch.manual_seed(6)
    gate, up, down = mlp_modules("nf4", torch.float32, False, True, inter=160)
    x = torch.randn(37, 96, device=device(), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_mlp(x, gate, up, down, "silu")
    # x, then per projection A, B and its input times A^T ([37 x 8]); no [37 x 160] gate, up or h
    expected = [(37, 96)] + [(8, 96), (160, 8), (37, 8)] * 2 + [(8, 160), (96, 8), (37, 8)]
    assert sorted(tuple(t.shape) for t in saved) == sorted(expected)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh", "gelu"])
@pytest.mark.parametrize("halves", [False, True], ids=["separate", "halves"])
def test_gated_backward_in_place_matches_float64(halves, activation):
    torch.manual_seed(7)
    dev = device()
    if halves:  # Phi-3: gate and up are the halves of one projection output
        gate, up = (torch.randn(37, 2 * 130, device=dev) * 3).to(torch.bfloat16).chunk(2, dim=-1)
    else:
        gate = (torch.randn(37, 130, device=dev) * 3).to(torch.bfloat16)
        up = torch.randn(37, 130, device=dev).to(torch.bfloat16)
    dh = torch.randn(37, 130, device=dev).to(torch.bfloat16)
    g64, u64 = gate.double().requires_grad_(), up.double().requires_grad_()
    h64 = ops.gated_activation(g64, u64, activation)
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    gated_backward_in_place(gate, up, dh, activation)
    assert_close(gate, dg64, torch.bfloat16, "dgate")
    assert_close(up, du64, torch.bfloat16, "dup")
    assert_close(dh, h64, torch.bfloat16, "h")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("rows,cols,ranks", [(37, 130, (8, 8)), (300, 260, (32, 16)), (5, 16, (40, 3))], ids=str)
def test_gated_kernels_add_the_lora_terms_on_their_tiles(rows, cols, ranks, activation):
    # gate and up hold the base products only; g = gate + s_g xa_g B_g^T (u likewise) in float64 is the reference
    # for both the forward (h) and the in-place backward (dgate, dup, h). Sizes off the 64 x 128 tiles, a row
    # count past one program's four tiles, ranks below, at and past the padded 16 and 32
    torch.manual_seed(seed("gated lora", rows, cols, ranks, activation))
    dev = device()
    gate, up, dh = ((torch.randn(rows, cols, device=dev) * k).to(torch.bfloat16) for k in (3, 1, 1))
    (ra, rb), (sg, su) = ranks, (0.5, 2.0)
    xa_g, xa_u = (torch.randn(rows, r, device=dev).to(torch.bfloat16) for r in (ra, rb))
    b_g, b_u = (torch.randn(cols, r, device=dev).div(r**0.5).to(torch.bfloat16) for r in (ra, rb))
    lora = (xa_g, b_g, sg, xa_u, b_u, su)
    g64 = (gate.double() + sg * xa_g.double() @ b_g.double().t()).requires_grad_()
    u64 = (up.double() + su * xa_u.double() @ b_u.double().t()).requires_grad_()
    h64 = ops.gated_activation(g64, u64, activation)
    dg64, du64 = torch.autograd.grad(h64, (g64, u64), dh.double())
    assert_close(gated_lora_activation(gate, up, lora, activation), h64, torch.bfloat16, "h (forward)")
    gated_backward_in_place(gate, up, dh, activation, lora=lora)
    assert_close(gate, dg64, torch.bfloat16, "dgate")
    assert_close(up, du64, torch.bfloat16, "dup")
    assert_close(dh, h64, torch.bfloat16, "h")


# --- full size (GPU): Llama-3-8B and Gemma-7B shapes, 2 x 2048 tokens, NF4 base, bf16 autocast, r = 32 -----


@pytest.mark.gpu
@pytest.mark.parametrize("n_in,n_out", [(4096, 14336), (14336, 4096), (4096, 1024)], ids=str)
def test_lora_linear_full_size(n_in, n_out):
    torch.manual_seed(n_in + n_out)
    m = adapted(base_linear(n_in, n_out, "nf4", torch.bfloat16), r=32, alpha=16)
    x = torch.randn(2, 2048, n_in, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 2048, n_out, device="cuda")
    params = [x, m.lora_A.weight, m.lora_B.weight]
    assert m.uses_kernel(x)  # on CUDA by default
    fused = run(lambda: m(x), params, dy, torch.bfloat16)
    plain_path = run(lambda: twin(m, kernels_off())(x), params, dy, torch.bfloat16)
    x64 = _r(x, None)
    m.A64, m.B64 = _r(m.lora_A.weight, torch.bfloat16), _r(m.lora_B.weight, torch.bfloat16)
    y64 = linear64(x64, m, torch.bfloat16)
    ref = [y64.detach(), *torch.autograd.grad(y64, [x64, m.A64, m.B64], dy.double())]
    check(fused, plain_path, ref, ["y", "dx", "dA", "dB"], torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,inter,activation", [(4096, 14336, "silu"), (3072, 24576, "gelu_tanh")], ids=str)
def test_lora_mlp_full_size(hidden, inter, activation):
    torch.manual_seed(inter)
    gate, up, down = mlp_modules("nf4", torch.bfloat16, False, True, hidden=hidden, inter=inter, r=32)
    x = torch.randn(2, 2048, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 2048, hidden, device="cuda")
    loras = [gate, up, down]
    params = [x] + [p for m in loras for p in (m.lora_A.weight, m.lora_B.weight)]
    assert mlp_uses_kernel(x, DEFAULT_OPTIONS, gate, up, down)
    fused = run(lambda: lora_mlp(x, gate, up, down, activation), params, dy, torch.bfloat16)
    plain_path = run(lambda: plain_mlp(x, gate, up, down, activation), params, dy, torch.bfloat16)
    x64 = _r(x, None)
    for m in loras:
        m.A64, m.B64 = _r(m.lora_A.weight, torch.bfloat16), _r(m.lora_B.weight, torch.bfloat16)
    y64 = mlp64(x64, gate, up, down, activation, torch.bfloat16)
    ref = [y64.detach(), *torch.autograd.grad(y64, [x64] + [t for m in loras for t in (m.A64, m.B64)], dy.double())]
    check(fused, plain_path, ref, ["y", "dx", "gate.A", "gate.B", "up.A", "up.B", "down.A", "down.B"], torch.bfloat16)


# --- through the decoder, with gradient checkpointing --------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    out = {}
    for family in ("llama", "phi3", "gemma", "gemma2"):
        out[family] = tmp_path_factory.mktemp(family) / "model"
        extra = {"query_pre_attn_scalar": 16} if family == "gemma2" else {}
        builders.save_tiny_model(out[family], family, 128, bos_token_id=1, eos_token_id=2, pad_token_id=0, **extra)
    return out


def adapted_model(path: Path, *, fused: bool, checkpointing: str, load_in_4bit: bool = False,
                  dtype: torch.dtype = torch.float32, fp8: bool = False) -> nn.Module:
    """The tiny model at path, weights in dtype, with LoRA r=4 on every linear (B nonzero), built with the kernels
    on (`fused`: every LoRALinear takes its fused path and the decoder's MLP runs lora_mlp) or off, in a
    recompute mode; with `fp8` its NF4 bases run e4m3 forward products (ModelOptions.fp8)."""
    options = (kernels_on if fused else kernels_off)(recompute=checkpointing, fp8=fp8)
    model = load_model(path, dtype=dtype, device=device(), load_in_4bit=load_in_4bit, options=options)
    torch.manual_seed(0)
    apply_lora(model, LoRASettings(r=4, alpha=8))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.05)
    if fp8:
        assert fp8_layers(model) == len(lora_modules(model))
    return model


def decoder_loss_and_grads(path: Path, *, fused: bool, checkpointing: str, load_in_4bit: bool = False,
                           autocast: torch.dtype | None = None, dtype: torch.dtype = torch.float32,
                           fp8: bool = False):
    """(loss, LoRA grads, the autograd node of every MLP output built with grad enabled) for one step of
    adapted_model(path, ...)."""
    model = adapted_model(path, fused=fused, checkpointing=checkpointing, load_in_4bit=load_in_4bit, dtype=dtype,
                          fp8=fp8)
    mlp_nodes = []

    def record(module, args, out):
        if out.grad_fn is not None:  # offload's first forward runs without grad; its recompute has a node
            mlp_nodes.append(out.grad_fn)

    for layer in model.model.layers:
        layer.mlp.register_forward_hook(record)
    model.train()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 17), generator=g).to(device())
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    with torch.autocast(device().type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        out = model(ids, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.loss.detach(), grads, mlp_nodes


@pytest.mark.parametrize("family,load_in_4bit,autocast,checkpointing", [
    ("llama", False, None, "off"), ("llama", False, None, "on"), ("llama", False, None, "offload"),
    ("llama", True, None, "on"), ("llama", False, torch.bfloat16, "on"), ("phi3", False, None, "offload"),
    ("gemma", False, None, "on"), ("gemma2", False, None, "on"), ("gemma2", False, None, "offload")],
    ids=["llama-off", "llama-on", "llama-offload", "llama-nf4-on", "llama-bf16-on", "phi3-offload", "gemma-on",
         "gemma2-on", "gemma2-offload"])
def test_decoder_mlp_runs_lora_mlp_and_its_gradients_equal_the_plain_path(tiny_models, family, load_in_4bit,
                                                                          autocast, checkpointing):
    """Every projection fused (attention through lora_linear, the decoder's own MLP through lora_mlp),
    without checkpointing (gate/up recomputed in the MLP's backward) and with the layers recomputed or
    offloaded (gate/up kept from the layer's recompute), against the plain path without checkpointing."""
    path = tiny_models[family]
    ref_loss, ref_grads, ref_nodes = decoder_loss_and_grads(path, fused=False, checkpointing="off",
                                                            load_in_4bit=load_in_4bit, autocast=autocast)
    assert len(ref_grads) == 2 * 2 * (4 if family == "phi3" else 7)  # layers x (A, B) x adapted linears
    assert not any(type(node).__name__ == "LoRAMLPFunctionBackward" for node in ref_nodes)
    loss, grads, nodes = decoder_loss_and_grads(path, fused=True, checkpointing=checkpointing,
                                                load_in_4bit=load_in_4bit, autocast=autocast)
    assert len(nodes) >= 2 and {type(node).__name__ for node in nodes} == {"LoRAMLPFunctionBackward"}
    assert {node.recompute for node in nodes} == {checkpointing == "off"}
    assert grads.keys() == ref_grads.keys()
    if autocast is None:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        return
    # bf16: the two paths round different intermediates, each about 1% from float32 per gradient (up to 1.5%
    # over this model), so they can differ from each other by the sum. Against the same model in float32:
    # every gradient within 2^-5, and on average the fused path no further off than the plain one.
    torch.testing.assert_close(loss, ref_loss, rtol=2.0**-7, atol=0)
    _, f32_grads, _ = decoder_loss_and_grads(path, fused=False, checkpointing="off", load_in_4bit=load_in_4bit)
    fused_err = {name: relative_error(grads[name], f32_grads[name]) for name in grads}
    plain_err = {name: relative_error(ref_grads[name], f32_grads[name]) for name in grads}
    assert max(fused_err.values()) < 2.0**-5, fused_err
    assert sum(fused_err.values()) <= 1.25 * sum(plain_err.values()), (fused_err, plain_err)


def test_mlp_recomputes_gate_up_only_when_the_layers_are_not_recomputed(tiny_models):
    for mode, recompute in [("on", False), ("off", True), ("offload", False)]:
        model = load_model(tiny_models["llama"], dtype=torch.float32, device=device(), load_in_4bit=False,
                           options=ModelOptions(recompute=mode))
        assert [layer.mlp.recompute_gate_up for layer in model.model.layers] == [recompute] * 2, mode


@pytest.mark.parametrize("family,checkpointing,down_products", [
    ("llama", "off", 2), ("llama", "on", 2), ("llama", "offload", 2), ("phi3", "on", 2), ("gemma2", "on", 3)])
def test_a_recomputed_layer_skips_its_down_product(tiny_models, monkeypatch, family, checkpointing, down_products):
    """Per layer and step: gate and up (or Phi-3's gate_up) are made dense for the forward, the layer's
    recompute (without checkpointing: the MLP's own) and their input gradient; down for its forward product and
    its input gradient only, the recompute leaving it out, except under Gemma 2's post-MLP norm, which
    saves the MLP output for its backward."""
    # patched where the projections (and the MLP, through them) look it up at call time
    import trainer.kernels.lora_projection as lora_projection

    shapes: list[tuple[int, int]] = []  # (in, out) of every base layer made dense
    real = lora_projection.dense_weight
    monkeypatch.setattr(lora_projection, "dense_weight",
                        lambda base, dtype: shapes.append((base.in_features, base.out_features)) or real(base, dtype))
    decoder_loss_and_grads(tiny_models[family], fused=True, checkpointing=checkpointing)
    mlp = load_model(tiny_models[family], dtype=torch.float32, device=device()).model.layers[0].mlp
    # gate and up have one shape: count them together
    (gate, inputs), down = (mlp.gate_up_proj, 1) if family == "phi3" else (mlp.gate_proj, 2), mlp.down_proj
    n_layers = 2
    assert shapes.count((down.in_features, down.out_features)) == down_products * n_layers
    assert shapes.count((gate.in_features, gate.out_features)) == 3 * inputs * n_layers


@pytest.mark.parametrize("checkpointing", ["on", "offload"])
def test_factor_casts_are_made_once_per_step_and_change_no_gradient(tiny_models, checkpointing):
    """Two micro-batches in one cached_factor_casts scope, bf16 autocast, the layers recomputed: one cached
    copy per LoRA factor (the backward's aliases of the factors hit the forward's copies instead of adding
    entries), and the same loss and gradients, bit for bit, as without the cache."""
    import trainer.kernels.lora_workspace as lora_workspace  # where the cache lives (a module global)

    def two_micro_batches(cached: bool):
        model = adapted_model(tiny_models["llama"], fused=True, checkpointing=checkpointing)
        model.train()
        g = torch.Generator().manual_seed(1)
        losses, entries = [], None
        with cached_factor_casts() if cached else contextlib.nullcontext():
            for _ in range(2):
                ids = torch.randint(3, 128, (2, 17), generator=g).to(device())
                with torch.autocast(device().type, dtype=torch.bfloat16):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                losses.append(loss.detach())
            if cached:
                entries = len(lora_workspace._CASTS)
        assert lora_workspace._CASTS is None  # dropped on exit
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return losses, grads, entries

    losses, grads, entries = two_micro_batches(cached=True)
    # 2 layers x 7 linears x (A, B); float32 weights under bf16 autocast: q, k and v run apart (lora_projections)
    assert entries == len(grads)
    ref_losses, ref_grads, _ = two_micro_batches(cached=False)
    assert all(torch.equal(a, b) for a, b in zip(losses, ref_losses))
    for name in grads:
        assert torch.equal(grads[name], ref_grads[name]), name


def test_a_factor_changed_in_place_inside_the_scope_is_cast_again():
    torch.manual_seed(8)
    m = adapted(base_linear(64, 32, "linear", torch.float32))
    x = torch.randn(5, 64, device=device())
    with torch.no_grad(), torch.autocast(device().type, dtype=torch.bfloat16), cached_factor_casts():
        lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling)
        m.lora_B.weight.mul_(3.0)
        y = lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling)
    with torch.no_grad(), torch.autocast(device().type, dtype=torch.bfloat16):
        fresh = lora_linear(x, m.base_layer, m.lora_A.weight, m.lora_B.weight, m.scaling)
    assert torch.equal(y, fresh)
