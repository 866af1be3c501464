"""Math helpers shared by the kernels, written so they also run under TRITON_INTERPRET=1."""

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh in float32 within a few ulps (libdevice.tanh has no interpreter implementation; CI runs on CPU).

    1 - 2 / (exp(2x) + 1) saturates cleanly but loses ~1e-7 absolute to cancellation near 0, so
    |x| < 0.3 uses the Taylor series to x^11 (the next term is below 1e-9 relative there).
    """
    x2 = x * x
    series = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    return tl.where(tl.abs(x) < 0.3, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


# Host-side launch arithmetic. triton.cdiv and triton.next_power_of_2 are jit-wrapped in Triton 3.x
# and cost ~6 us a call on the host; a training step makes thousands of launches, and its GPU waits
# on the host (bench/profile_step.py), so the launch wrappers use these plain versions.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
