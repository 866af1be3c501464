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
