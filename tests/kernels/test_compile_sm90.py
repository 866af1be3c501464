"""The kernels' GPU-only branches compile for the H100 (sm_90), on this CPU machine.

Under TRITON_INTERPRET=1 the kernels run as Python, and the FP8 ones take their interpreter-only branch
(e4m3 bit patterns by integer operations): the branches a GPU runs, with the hardware cast, are never traced
there. Triton compiles for a named target without a GPU (its frontend, MLIR passes, LLVM and the bundled
ptxas), so this builds those branches to a cubin the way a GPU launch would, in a subprocess where
TRITON_INTERPRET is unset. It caught a global read inside a kernel that the interpreter allows and the
compiler refuses; it also checks that the float32 -> e4m3 cast is the saturating round-to-nearest-even
instruction the CPU tests' bit-for-bit comparisons stand in for.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = r"""
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from trainer.kernels import fp8, nf4

target = GPUTarget("cuda", 90, 32)
which = sys.argv[1]
if which.startswith("quantize_rows"):
    one_pass = which.endswith("one pass")
    src = ASTSource(fp8._quantize_rows,
                    signature={"x_ptr": "*bf16", "out_ptr": "*fp8e4nv", "scale_ptr": "*fp32", "n_cols": "i32",
                               "x_row_stride": "i32", "out_row_stride": "i32", "BLOCK": "constexpr",
                               "ONE_PASS": "constexpr", "BY_BITS": "constexpr"},
                    constexprs={"BLOCK": 16384 if one_pass else fp8._BLOCK_MAX, "ONE_PASS": one_pass,
                                "BY_BITS": False})
    options = {"num_warps": 16 if one_pass else 8}
elif which.startswith("gated backward"):  # no GPU-only branch, but tl.dot's shapes are checked here only
    from trainer.kernels import lora_mlp as lf
    lora = which.endswith("LoRA on tiles")
    src = ASTSource(lf._gated_bwd_in_place,
                    signature={"gate_ptr": "*bf16", "up_ptr": "*bf16", "dh_ptr": "*bf16", "gate_row_stride": "i32",
                               "up_row_stride": "i32", "dh_row_stride": "i32", "n_rows": "i32", "n_cols": "i32",
                               "xag_ptr": "*bf16", "bg_ptr": "*bf16", "xau_ptr": "*bf16", "bu_ptr": "*bf16",
                               "scale_g": "fp32", "scale_u": "fp32", "rank_g": "i32", "rank_u": "i32",
                               "ACT": "constexpr", "LORA": "constexpr", "RANK_G": "constexpr", "RANK_U": "constexpr",
                               "ROWS": "constexpr", "BLOCK": "constexpr", "ROW_TILES": "constexpr"},
                    constexprs={"ACT": 0, "LORA": lora, "RANK_G": 32, "RANK_U": 32,
                                "ROWS": lf._LORA_ROWS if lora else 1, "BLOCK": lf._LORA_BLOCK if lora else 2048,
                                "ROW_TILES": lf._LORA_ROW_TILES if lora else 1})
    options = {"num_warps": 8}
else:  # the NF4 dequantization writing e4m3 with per-row scales, nested absmax
    src = ASTSource(nf4._dequantize_4bit,
                    signature={"packed_ptr": "*u8", "absmax_ptr": "*u8", "code_ptr": "*fp32", "code2_ptr": "*fp32",
                               "absmax2_ptr": "*fp32", "offset_ptr": "*fp32", "row_scale_ptr": "*fp32",
                               "out_ptr": "*fp8e4nv", "n_elements": "i64", "n_blocks": "i32", "n_cols": "i32",
                               "BLOCKSIZE": "constexpr", "BLOCKSIZE2": "constexpr", "ROWS": "constexpr",
                               "NESTED": "constexpr", "ROW_SCALED": "constexpr", "BF16_BY_BITS": "constexpr",
                               "E4M3_BY_BITS": "constexpr"},
                    constexprs={"BLOCKSIZE": 64, "BLOCKSIZE2": 256, "ROWS": nf4._ELEMENTS // 64, "NESTED": True,
                                "ROW_SCALED": True, "BF16_BY_BITS": False, "E4M3_BY_BITS": False})
    options = {"num_warps": nf4._WARPS, "enable_fp_fusion": False}
kernel = triton.compile(src, target=target, options=options)
ptx = kernel.asm["ptx"]
print(json.dumps({"cubin_bytes": len(kernel.asm["cubin"]), "casts": sorted(set(re.findall(r"cvt\.[a-z0-9.]+", ptx))),
                  "target": re.search(r"\.target (\w+)", ptx).group(1)}))
"""


@pytest.mark.parametrize("kernel", ["quantize_rows, one pass", "quantize_rows, two passes", "nf4 to e4m3",
                                    "gated backward, LoRA on tiles", "gated backward, plain"])
def test_gpu_branch_compiles_for_sm90(kernel):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, kernel], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["target"] == "sm_90a" and info["cubin_bytes"] > 0, info
    if "gated" not in kernel:  # float32 -> e4m3 rounded to nearest even, saturated at +-448 (as e4m3_bits does)
        assert "cvt.rn.satfinite.e4m3x2.f32" in info["casts"], info["casts"]
