
import pytest
import torch
from kernel_checks import DTYPES, assert_close, device, seed

from trainer.kernels.gated_act import gated_activation
from trainer.models import ops

ACTIVATIONS = ["silu", "gelu_tanh", "gelu"]

# The interpreter's numpy overflows exp() in saturated tails on purpose (exp -> inf -> sigmoid 0).
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _check(gate: torch.Tensor, up: torch.Tensor, activation: str, dtype: torch.dtype) -> None:
    gate, up = gate.requires_grad_(), up.requires_grad_()
    dout = torch.randn(gate.shape, device=gate.device).to(dtype)
    out = gated_activation(gate, up, activation)
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)

    # Reference: ops.gated_activation in float64.
    g64, u64 = gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()
    ref = ops.gated_activation(g64, u64, activation)
    dgate_ref, dup_ref = torch.autograd.grad(ref, (g64, u64), dout.double())

    assert out.dtype == dgate.dtype == dup.dtype == dtype
    assert_close(out, ref, dtype, "out")
    assert_close(dgate, dgate_ref, dtype, "dgate")
    assert_close(dup, dup_ref, dtype, "dup")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(2, 9, 100), (3, 1500)], ids=str)
def test_gated_activation_matches_float64_reference(shape, dtype, activation):
    torch.manual_seed(seed(shape, str(dtype), activation))
    dev = device()
    # Spread of 3: covers the saturated tails of silu/gelu as well as the curved middle.
    gate = (torch.randn(shape, device=dev) * 3).to(dtype)
    up = torch.randn(shape, device=dev).to(dtype)
    _check(gate, up, activation, dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_gated_activation_on_halves_of_a_fused_projection(activation):
    """Phi-3's gate_up_proj output is split with chunk(2): strided views, no copy."""
    torch.manual_seed(4)
    fused = (torch.randn(2, 5, 2 * 96, device=device()) * 2).to(torch.bfloat16)
    gate, up = fused.chunk(2, dim=-1)
    assert not gate.is_contiguous()
    _check(gate, up, activation, torch.bfloat16)


def test_gated_activation_far_tails_stay_finite():
    dev = device()
    gate = torch.tensor([-100.0, -30.0, -9.0, 0.0, 1e-4, 9.0, 30.0, 100.0], device=dev).repeat(3, 1)
    up = torch.linspace(-2, 2, gate.numel(), device=dev).view_as(gate)
    for activation in ACTIVATIONS:
        _check(gate.clone(), up.clone(), activation, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("intermediate", [14336, 24576], ids=str)
def test_gated_activation_full_size(intermediate, dtype, activation):
    torch.manual_seed(intermediate)
    gate = (torch.randn(2, 1023, intermediate, device="cuda") * 3).to(dtype)
    up = torch.randn(2, 1023, intermediate, device="cuda").to(dtype)
    _check(gate, up, activation, dtype)
