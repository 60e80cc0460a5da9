"""Build DeepSpeed's JIT C++ ops once (into TORCH_EXTENSIONS_DIR) so no run or test pays for it.

On CPU, DeepSpeed compiles its shared-memory collective op at `init_distributed`; built
concurrently by every worker it costs minutes, built once here under a minute.  (The optimizer
is torch's AdamW, see lmjobs.strategy; ZeRO-Offload builds DeepSpeed's CPU Adam on first use.)
"""
from __future__ import annotations

import os
import sys
import time

OPS = ("ShareMemCommBuilder",)


def use_environment_ninja() -> None:
    """Put this environment's `ninja` first on PATH.  torch runs whichever `ninja` PATH finds, and
    two versions (the venv's pip `ninja` and a system one) keep logs ninja cannot share: each finds
    the other's log stale and rebuilds the op (a minute of two cores) in every job that alternates."""
    bindir = os.path.dirname(sys.executable)
    if os.path.exists(os.path.join(bindir, "ninja")):
        path = os.environ.get("PATH", "").split(os.pathsep)
        if path[:1] != [bindir]:
            os.environ["PATH"] = os.pathsep.join([bindir, *(p for p in path if p != bindir)])


def build(names=OPS) -> None:
    from deepspeed.accelerator import get_accelerator

    use_environment_ninja()
    where = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
    for name in names:
        t0 = time.perf_counter()
        builder = get_accelerator().create_op_builder(name)
        if builder is None:
            continue
        builder.load(verbose=False)
        print(f"DeepSpeed op {builder.name} ready in {where} ({time.perf_counter() - t0:.1f}s)", flush=True)


if __name__ == "__main__":
    build()
