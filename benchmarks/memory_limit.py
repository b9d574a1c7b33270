"""`kpac deblur` of a large photo inside a container-like memory limit: does it finish, and at what peak?

    sudo python benchmarks/memory_limit.py --limit-gib 3 --model kpac-2level
    sudo python benchmarks/memory_limit.py --limit-gib 4 --size 6000x4000 --model kpac-3level

Makes a control group with a hard memory limit (cgroup v1 ``memory.limit_in_bytes`` or v2
``memory.max``; needs the right to create one, usually root), writes a procedural photo of
``--size`` as an 8-bit TIFF, and runs ``python -m kpac_cli deblur`` on it inside the group with
the default ``--tile auto``. Past the limit the kernel kills the process (status 137): the
engine has to plan for the limit, not recover from it. Prints the exit status, the group's peak
memory (page cache included), the tile the engine chose and the wall time, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def make_group(name: str, limit: int) -> tuple[Path, str, str]:
    """(group folder, file to read the peak from, file to add a process to)."""
    v1 = CGROUP / "memory"
    if (v1 / "memory.limit_in_bytes").exists():
        group = v1 / name
        group.mkdir(exist_ok=True)
        (group / "memory.limit_in_bytes").write_text(str(limit))
        (group / "memory.max_usage_in_bytes").write_text("0")
        return group, "memory.max_usage_in_bytes", "cgroup.procs"
    group = CGROUP / name  # cgroup v2
    group.mkdir(exist_ok=True)
    (group / "memory.max").write_text(str(limit))
    (group / "memory.swap.max").write_text("0")
    return group, "memory.peak", "cgroup.procs"


def write_photo(path: Path, width: int, height: int) -> None:
    import numpy as np
    import tifffile
    from skimage import data, transform

    photo = transform.resize(data.astronaut(), (height, width), order=1)
    tifffile.imwrite(path, (photo * 255).astype(np.uint8))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit-gib", type=float, default=3.0)
    ap.add_argument("--size", default="6000x4000", help="WxH of the photo")
    ap.add_argument("--model", default="kpac-2level")
    args = ap.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    try:
        group, peak_file, procs = make_group(f"kpac-bench-{os.getpid()}", int(args.limit_gib * 2**30))
    except OSError as e:
        sys.exit(f"cannot make a memory-limited control group here ({e}); run as root on Linux")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            photo = Path(tmp) / "photo.tif"
            write_photo(photo, width, height)
            command = [sys.executable, "-m", "kpac_cli", "deblur", str(photo), "-o", str(Path(tmp) / "out.tif"),
                       "-m", args.model, "--json"]
            start = time.perf_counter()
            # the child joins the group before it starts Python, so all of its memory counts
            run = subprocess.run(["sh", "-c", f'echo $$ > "{group / procs}" && exec "$@"', "sh", *command],
                                 capture_output=True, text=True)
            seconds = time.perf_counter() - start
            record = json.loads(run.stdout.splitlines()[-1]) if run.returncode == 0 and run.stdout.strip() else {}
            print(json.dumps({
                "model": args.model, "size": f"{width}x{height}", "limit_gib": args.limit_gib,
                "exit_status": run.returncode if run.returncode >= 0 else 128 - run.returncode,
                "peak_gib": round(int((group / peak_file).read_text()) / 2**30, 2),
                "tile": record.get("tile"), "seconds": round(seconds, 1),
            }))
    finally:
        try:
            group.rmdir()
        except OSError:
            pass


if __name__ == "__main__":
    main()
