"""The device probe: `auto` picks the faster precision on both CPU kinds, the measurement is bounded
whatever the CPU, and a node measures once per thread count (later jobs read its cache)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from lmjobs.device import (CPU_SIZES, PROBE_BUDGET_S, device_key, measure, needed_rates, peak_for, probe,
                           resolve_precision)
from tests.conftest import REPO


def cpu_model(fp32_gflops: float, bf16_gflops: float):
    """Seconds of one n x n product on a modelled CPU: its peak rate, reached from n ~ 1024 (small
    products read lower, as real GEMMs do), plus a fixed call overhead.  Returns the timing
    function and the log of the products it was asked for."""
    peaks = {"fp32": fp32_gflops * 1e9, "bf16": bf16_gflops * 1e9}
    asked: list[tuple[str, int]] = []

    def seconds(name: str, n: int) -> float:
        asked.append((name, n))
        efficiency = min(1.0, 0.4 + 0.6 * n / 1024)
        return 2.0 * n**3 / (peaks[name] * efficiency) + 20e-6

    return seconds, asked


@pytest.mark.parametrize("kind, fp32, bf16, expected", [
    ("AVX2-only EPYC, 1 thread", 60, 0.6, "fp32"),
    ("AVX2-only EPYC, bf16 at its worst", 60, 0.5, "fp32"),
    ("AVX-512 BF16 / AMX, 2 threads", 210, 816, "bf16_autocast"),
    ("AVX-512 without BF16 (bf16 emulated)", 150, 20, "fp32"),
    ("bf16 slightly faster: not worth the rounding", 100, 120, "fp32"),
])
def test_auto_picks_the_faster_precision_within_the_budget(kind, fp32, bf16, expected):
    seconds, asked = cpu_model(fp32, bf16)
    result = probe(("fp32", "bf16"), seconds, CPU_SIZES)
    assert resolve_precision("auto", result["rates"]) == expected, (kind, result)
    # bounded by construction: the budget, plus at most the first size's products
    first = 3 * (2 * CPU_SIZES[0] ** 3) / (min(fp32, bf16) * 1e9 * 0.55)
    assert result["seconds"] <= PROBE_BUDGET_S + first, (kind, result)
    if bf16 * 4 < fp32:  # clearly slower at the first size: never probed larger
        assert {n for name, n in asked if name == "bf16"} == {CPU_SIZES[0]}, asked
    if expected == "fp32":
        assert peak_for("fp32", result["rates"]) == result["rates"]["fp32"]


def test_the_probe_never_costs_minutes_even_on_the_slowest_cpu():
    # both precisions at 0.5 GFLOP/s (a slow core, bf16 emulated): one 256^2 product is 0.07 s,
    # and no larger size is started once the budget could not hold it
    seconds, asked = cpu_model(0.5, 0.5)
    result = probe(("fp32", "bf16"), seconds, CPU_SIZES)
    assert result["seconds"] < PROBE_BUDGET_S + 0.5, result
    assert max(n for _, n in asked) <= 512


def test_a_fixed_precision_measures_only_what_its_mfu_needs():
    assert needed_rates("auto", peak_declared=True) == ("fp32", "bf16")  # the choice needs both
    assert needed_rates("fp32", peak_declared=False) == ("fp32",)
    assert needed_rates("fp32", peak_declared=True) == ()
    assert needed_rates("bf16_autocast", peak_declared=True) == ()
    assert resolve_precision("fp32", {"fp32": 0.2, "bf16": 0.8}) == "fp32"  # an explicit choice stands
    assert peak_for("bf16_autocast", {"fp32": 0.2, "bf16": 0.8}) == 0.8


def _independent_rates(n: int = 512) -> dict[str, float]:
    """fp32 and bf16 rates from products of another size, timed here without the probe."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        out[name] = 2 * n**3 / best / 1e12
    return out


def test_on_this_cpu_auto_picks_the_precision_that_is_faster_here():
    t0 = time.perf_counter()
    result = measure(torch.device("cpu"))
    wall = time.perf_counter() - t0
    assert wall < PROBE_BUDGET_S + 1.5, (wall, result)
    rates = result["rates"]
    assert 0.005 < rates["fp32"] < 20, rates  # 2-core CPUs: 0.05-1 TFLOP/s; far outside is a timing bug
    check = _independent_rates()
    ratio = check["bf16"] / check["fp32"]
    print(f"{device_key(torch.device('cpu'))['hardware']}: probe {rates}, 512^2 check {check}")
    if ratio >= 2.0:  # a bf16-fast CPU (AVX-512 BF16 / AMX)
        assert resolve_precision("auto", rates) == "bf16_autocast"
    elif ratio <= 1.2:  # bf16 no faster (AVX2-only: 50-100x slower)
        assert resolve_precision("auto", rates) == "fp32"


def _probe_in_a_process(cache: str, threads: int, extra_env: dict | None = None) -> dict:
    code = ("import json, torch; torch.set_num_threads(%d); from lmjobs.device import device_rates; "
            "r = device_rates(torch.device('cpu'), ('fp32', 'bf16')); "
            "print(json.dumps({'rates': r['rates'], 'cached': r['cached']}))" % threads)
    env = {**os.environ, "LMJOBS_DEVICE_CACHE": cache, **(extra_env or {})}
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_node_measures_once_per_thread_count_and_later_processes_read_its_cache(tmp_path):
    cache = str(tmp_path / "cache")
    first = _probe_in_a_process(cache, threads=1)
    again = _probe_in_a_process(cache, threads=1)
    assert first["cached"] is False and again["cached"] is True
    assert again["rates"] == first["rates"]
    other = _probe_in_a_process(cache, threads=2)  # another thread count is another measurement
    assert other["cached"] is False
    limited = _probe_in_a_process(cache, threads=1, extra_env={"ATEN_CPU_CAPABILITY": "avx2"})
    assert limited["cached"] is False  # kernel limits are part of the key
    assert len([f for f in os.listdir(cache) if f.endswith(".json")]) == 3


def test_workers_starting_together_on_one_node_measure_once(tmp_path):
    cache = str(tmp_path / "cache")
    code = ("import json, torch; torch.set_num_threads(1); from lmjobs.device import device_rates; "
            "r = device_rates(torch.device('cpu'), ('fp32', 'bf16')); print(json.dumps(r['cached']))")
    env = {**os.environ, "LMJOBS_DEVICE_CACHE": cache}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    cached = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert sorted(cached) == [False, True]  # one measured, the other waited and read
