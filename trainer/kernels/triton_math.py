"""Math helpers shared by the kernels, written so they also run under TRITON_INTERPRET=1."""

import triton
import triton.language as tl

# Whether Triton runs kernels in its interpreter (TRITON_INTERPRET=1), as Triton decides it when a kernel is
# decorated: the one place the kernel modules learn it (their interpreter-only branches and CPU asserts).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)


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
# and cost microseconds a call on the host; a training step makes thousands of launches, and its GPU waits
# on the host (bench/profile_step.py), so the launch wrappers use these plain versions.
def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive integers."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


E4M3_MAX = 448.0  # the largest finite float8_e4m3fn


@triton.jit
def e4m3_bits(x):
    """The float8_e4m3fn bit patterns (uint8) of float32 x, rounded to nearest even and saturated at +-448, by
    integer operations: under TRITON_INTERPRET=1 Triton's own float32 -> float8 cast rounds wrongly where the
    mantissa carries into the exponent (31.6 gives 16, not 32). On a GPU the kernels use the hardware cast
    (cvt.rn.satfinite), which gives these same bits."""
    bits = x.to(tl.uint32, bitcast=True)
    sign = (bits >> 31) << 7
    a = tl.abs(x)
    abits = a.to(tl.uint32, bitcast=True)
    # normals (|x| >= 2^-6): keep 3 of float32's 23 mantissa bits, ties to even, then move the exponent's
    # bias from 127 to 7 (a carry out of the mantissa correctly bumps the exponent)
    normal = ((abits + 0x7FFFF + ((abits >> 20) & 1)) >> 20).to(tl.int32) - (120 << 3)
    # subnormals: multiples of 2^-9; a * 2^9 is exact, and adding then subtracting 2^23 rounds it to an integer,
    # ties to even (8 is the smallest normal, 2^-6: the two branches meet)
    sub = ((tl.minimum(a, 0.015625) * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.minimum(tl.where(a < 0.015625, sub, normal), 126)  # 126 = 0x7E: 448
    return (code.to(tl.uint32) | sign).to(tl.uint8)
