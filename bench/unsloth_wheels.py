"""The wheels bench/train.py's Unsloth variant needs on the GPU machine, which reaches no package registry.

Downloads from PyPI, for that machine (CPython 3.12, x86-64 Linux, no dependencies resolved), the packages
its image lacks: Unsloth and Unsloth Zoo at the pinned version, bitsandbytes (every variant of
bench/train.py loads in 4-bit through it), and what `import unsloth` imports that the image does not hold
(TRL, datasets with dill and multiprocess; Cut Cross Entropy, which Unsloth Zoo's fused loss uses when
present). Then strips the unsloth wheel's studio/ folder (its web UI, most of the wheel's 28.6 MB) and
RECORD lines, so the folder fits the device tool's 64 MiB carry beside the tree, and prints the sizes.

Left out on purpose: xformers, flash-attn (none built for the machine's torch; Unsloth then attends through
torch's SDPA, which its variant records), torchao (compiled against one torch; Unsloth uses it for FP8 and
QAT only), hf_transfer and diffusers (downloads, image models).

    python bench/unsloth_wheels.py [--dest .whl]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_variants import UNSLOTH_PINS  # noqa: E402

PACKAGES = [*UNSLOTH_PINS, "bitsandbytes==0.50.2", "trl==1.15.0", "datasets==4.8.5", "dill==0.4.1",
            "multiprocess==0.70.19", "cut_cross_entropy==25.1.1"]
# as the device docs say, plus manylinux_2_24 (bitsandbytes 0.50.2 is tagged only so)
PLATFORM = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
            *(f"--platform=manylinux{t}_x86_64" for t in ("_2_28", "_2_27", "_2_24", "_2_17", "2014", "1"))]
CARRY_LIMIT = 64 * 2**20


def strip_folder(wheel: Path, folder: str) -> int:
    """Rewrite `wheel` without the files under `folder`/ and their RECORD lines; returns how many went."""
    with zipfile.ZipFile(wheel) as z:
        gone = [i for i in z.infolist() if i.filename.startswith(folder + "/")]
        if not gone:
            return 0
        tmp = wheel.with_suffix(".tmp")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in z.infolist():
                if info.filename.startswith(folder + "/"):
                    continue
                data = z.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    data = b"".join(line for line in data.splitlines(keepends=True)
                                    if not line.startswith(folder.encode() + b"/"))
                out.writestr(info, data)
    tmp.replace(wheel)
    return len(gone)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dest", default=".whl", help="folder for the wheels (gitignored; carry it)")
    args = ap.parse_args()
    dest = Path(args.dest)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", *PLATFORM, "-d", str(dest), *PACKAGES],
                   check=True)
    for wheel in dest.glob("unsloth-*.whl"):
        print(f"{wheel.name}: {strip_folder(wheel, 'studio')} files under studio/ removed")
    total = 0
    for wheel in sorted(dest.glob("*.whl")):
        size = wheel.stat().st_size
        total += size
        print(f"{size / 2**20:8.1f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.1f} MiB  in {dest} (the device tool carries 64 MiB with the tree)")
    if total > CARRY_LIMIT:
        sys.exit(f"{dest} is over the carry limit: remove what the run does not need")


if __name__ == "__main__":
    main()
