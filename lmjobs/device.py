"""The training device and its matmul rates: which precision `auto` takes, and the MFU denominator.

The rates are measured once per node, thread count and software stack, and cached on the node, so
no job, worker or trial pays for them twice.  The measurement is bounded by construction on any
CPU: it starts from matrices small enough that one product at 0.5 GFLOP/s takes under 0.1 s,
grows a size only while the next product's predicted time fits the budget, and stops probing a
precision once it is clearly slower than the other (bf16 on AVX2-only CPUs runs 50-100x slower
than fp32; with AVX-512 BF16 / AMX 2-4x faster).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import tempfile
import time
from typing import Callable, Iterable

import torch

# `precision: auto` takes bf16 autocast only where bf16 matmuls are clearly faster than fp32
AUTO_BF16_SPEEDUP = 1.5
# a precision this many times slower than the other at one size is not probed at larger sizes
CLEARLY_SLOWER = 4.0
# seconds the whole measurement may take on one node (both precisions, all sizes)
PROBE_BUDGET_S = 2.0
# CPU GEMMs reach their rate only from ~2048 (1024 read half the fp32 peak on an AVX-512 machine);
# 256 first: one product is 34 MFLOP, 0.07 s at 0.5 GFLOP/s
CPU_SIZES = (256, 512, 1024, 2048)
GPU_SIZES = (1024, 2048, 4096, 8192)
REPEATS = 3  # best of three products per size: one disturbed product must not lower the rate
CACHE_ENV = "LMJOBS_DEVICE_CACHE"  # a directory, or "off"
CACHE_MAX_AGE_S = 30 * 24 * 3600
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def training_device(use_gpu: bool) -> torch.device:
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def needed_rates(precision: str, peak_declared: bool) -> tuple[str, ...]:
    """What a run must measure: `auto` compares both; a fixed precision only what its MFU
    denominator needs (nothing when train.peak_tflops is declared)."""
    if precision == "auto":
        return ("fp32", "bf16")
    if peak_declared:
        return ()
    return ("fp32",) if precision == "fp32" else ("fp32", "bf16")


def resolve_precision(precision: str, rates: dict[str, float]) -> str:
    """`auto` -> bf16 autocast where the device's bf16 matmuls are clearly faster, else fp32."""
    if precision != "auto":
        return precision
    return "bf16_autocast" if rates["bf16"] >= AUTO_BF16_SPEEDUP * rates["fp32"] else "fp32"


def peak_for(precision: str, rates: dict[str, float]) -> float:
    """The MFU denominator: the fastest matmul rate the run's kernels could reach.  Mixed
    precision runs fp32 kernels too (norms, softmax, the optimizer), so take the better of the
    two; fp32 runs only fp32."""
    return rates["fp32"] if precision == "fp32" else max(rates.values())


# -- the probe ------------------------------------------------------------------------------------
def probe(names: Iterable[str], product_seconds: Callable[[str, int], float], sizes: tuple[int, ...],
          budget_s: float = PROBE_BUDGET_S) -> dict:
    """Rates (TFLOP/s) of `names` from products timed by `product_seconds(name, n)` (one n x n
    product's seconds), sizes ascending.  The first size always runs; a larger one only while its
    predicted time (from the rate just measured) fits what is left of the budget, and only for a
    precision not yet clearly slower than another.  Returns rates, the largest size per name and
    the names dropped for being slower."""
    alive = list(dict.fromkeys(names))
    rates = {name: 0.0 for name in alive}
    largest = {name: 0 for name in alive}
    dropped: list[str] = []
    spent = 0.0
    for index, n in enumerate(sizes):
        flop = 2.0 * n**3
        at_n: dict[str, float] = {}
        for name in list(alive):
            if index > 0:
                predicted = REPEATS * flop / (rates[name] * 1e12)
                if spent + predicted > budget_s:
                    alive.remove(name)  # larger sizes would not fit either
                    continue
            best = float("inf")
            for _ in range(REPEATS):
                seconds = max(product_seconds(name, n), 1e-9)
                spent += seconds
                best = min(best, seconds)
            at_n[name] = flop / best / 1e12
            rates[name] = max(rates[name], at_n[name])
            largest[name] = n
        if len(at_n) > 1:
            fastest = max(at_n.values())
            for name, rate in at_n.items():
                if rate * CLEARLY_SLOWER < fastest:
                    alive.remove(name)
                    dropped.append(name)
        if not alive:
            break
    return {"rates": rates, "largest": largest, "dropped": dropped, "seconds": round(spent, 3)}


def _torch_product_seconds(device: torch.device) -> Callable[[str, int], float]:
    """One real n x n matmul on `device`, timed; operands kept per (dtype, n) and made untimed, so
    the first timed product pays kernel selection and page faults (best-of hides it)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    operands: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def seconds(name: str, n: int) -> float:
        key = (name, n)
        if key not in operands:
            operands.clear()  # one size's operands alive at a time (8192^2 fp32 is 256 MiB a matrix)
            operands[key] = tuple(torch.randn(n, n, device=device).to(DTYPES[name]) for _ in range(2))
            sync()
        a, b = operands[key]
        t0 = time.perf_counter()
        a @ b
        sync()
        return time.perf_counter() - t0

    return seconds


def measure(device: torch.device, names: Iterable[str] = ("fp32", "bf16"), budget_s: float = PROBE_BUDGET_S) -> dict:
    """Measure now, with this process's threads (no cache)."""
    sizes = CPU_SIZES if device.type == "cpu" else GPU_SIZES
    with torch.no_grad():
        return probe(names, _torch_product_seconds(device), sizes, budget_s)


# -- the node cache -------------------------------------------------------------------------------
def _cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith(("flags", "Features")) and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                    break
    return model, flags


def _cpu_identity() -> str:
    """CPU model plus the ISA flags that decide matmul kernels (one model name, e.g. "AMD EPYC",
    covers generations with and without AVX-512)."""
    model, flags = _cpu_model_and_flags()
    isa = sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sve", "asimd")))
    return f"{model} [{' '.join(isa)}]"


def cpu_kind() -> str:
    """One line naming this CPU's kind for benchmark tables: the model, whether it has native bf16
    matmuls (AVX-512 BF16 / AMX), and the kernels torch picked (ATEN_CPU_CAPABILITY limits them)."""
    model, flags = _cpu_model_and_flags()
    bf16 = "avx512_bf16" in flags
    amx = bool({"amx_bf16", "amx_tile"} & flags)
    kind = ("AVX-512 BF16 + AMX" if bf16 and amx else "AVX-512 BF16, no AMX" if bf16
            else "AVX-512, no BF16/AMX" if "avx512f" in flags else "AVX2 only, no AVX-512 BF16/AMX"
            if "avx2" in flags else "no AVX2")
    return (f"{model}, {os.cpu_count()} cores: {kind}; torch kernels "
            f"{torch.backends.cpu.get_cpu_capability()}")


def device_key(device: torch.device, threads: int | None = None) -> dict:
    """What a measurement depends on: hardware, software, threads and the kernel-limiting
    environment (ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA select other kernels on the same CPU)."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_identity()
    return {"device": device.type, "hardware": hardware, "torch": torch.__version__,
            "threads": threads or torch.get_num_threads(),
            "env": {k: os.environ.get(k, "") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}}


def cache_dir() -> str | None:
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() in ("off", "0", "none"):
        return None
    return value or os.path.join(os.path.expanduser("~"), ".cache", "lmjobs", "device")


def device_rates(device: torch.device, names: Iterable[str]) -> dict:
    """The rates of `names` on `device` for this process's thread count: from the node's cache,
    or measured (one process per node and key at a time; the others wait and read) and cached.
    Returns {"rates": {...}, "cached": bool, "seconds": measuring time, "key": ...}."""
    names = tuple(dict.fromkeys(names))
    if not names:
        return {"rates": {}, "cached": True, "seconds": 0.0}
    key = device_key(device)
    root = cache_dir()
    if root is None:
        return {**measure(device, names), "cached": False, "key": key}
    os.makedirs(root, exist_ok=True)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = os.path.join(root, f"{digest}.json")
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second worker on this node waits for the first's figures
        try:
            entry = _read_entry(path, key)
            if entry and set(names) <= set(entry["rates"]):
                return {**entry, "rates": {n: entry["rates"][n] for n in names}, "cached": True, "seconds": 0.0}
            result = measure(device, names)
            _write_entry(path, {**result, "key": key, "measured_at": time.time()})
            return {**result, "cached": False, "key": key}
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read_entry(path: str, key: dict) -> dict | None:
    try:
        with open(path) as f:
            entry = json.load(f)
    except (OSError, ValueError):
        return None
    fresh = time.time() - float(entry.get("measured_at", 0)) < CACHE_MAX_AGE_S
    return entry if fresh and entry.get("key") == key and isinstance(entry.get("rates"), dict) else None


def _write_entry(path: str, entry: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(entry, f, indent=1)
    os.replace(tmp, path)  # readers see the old entry or the new one, never half of one
