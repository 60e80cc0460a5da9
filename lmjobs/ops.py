"""Build DeepSpeed's JIT C++ ops once (into TORCH_EXTENSIONS_DIR) so no run or test pays for it.

On CPU, DeepSpeed compiles its shared-memory collective op at `init_distributed`; built
concurrently by every worker it costs minutes, built once here under a minute.  (The optimizer
is torch's AdamW, see lmjobs.strategy; ZeRO-Offload builds DeepSpeed's CPU Adam on first use.)
"""
from __future__ import annotations

import os
import time

OPS = ("ShareMemCommBuilder",)


def build(names=OPS) -> None:
    from deepspeed.accelerator import get_accelerator

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
