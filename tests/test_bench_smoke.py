"""Every benchmark in bench/ runs in its --smoke mode and ends with a parseable ratio line.

The numbers of a smoke run mean nothing (tiny sizes, a few steps); what breaks here is the
wiring: a benchmark that no longer runs against the current engine, or that stopped printing
the line bench/RESULTS.md is built from.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = ["trainer_overhead.py", "peak_memory.py", "launcher_startup.py", "flow_bridge.py",
              "naive_peer.py", "reflow_quality.py", "kolmogorov_quality.py"]
RATIO_LINE = re.compile(r"^ratio: (\S+)$")


def run_smoke(script: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "offline",
           "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", *extra], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def last_ratio(stdout: str) -> float:
    lines = stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    match = RATIO_LINE.match(lines[-1])
    assert match, f"the last line is not 'ratio: <number>': {lines[-1]!r}"
    return float(match.group(1))


@pytest.mark.parametrize("script", BENCHMARKS)
def test_benchmark_smoke_run_ends_with_a_positive_ratio(script):
    if not (REPO / "bench" / script).is_file():
        pytest.skip(f"bench/{script} is not written yet (see bench/README.md)")
    result = run_smoke(script)
    assert result.returncode == 0, f"bench/{script} --smoke failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    ratio = last_ratio(result.stdout)
    assert ratio > 0 and ratio == ratio and ratio != float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("size", ["--sd15-size", "--sdxl-size"])
def test_sd_sized_unet_path_runs_through_the_engine(size):
    # The GPU figures run this path at full size; the smoke shrinks the widths, not the blocks.
    result = run_smoke("trainer_overhead.py", size)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "UNet" in result.stdout and last_ratio(result.stdout) > 0


def test_asking_for_cuda_without_one_fails_with_a_message():
    result = run_smoke("flow_bridge.py", "--device", "cuda")
    assert result.returncode != 0
    assert "no CUDA device" in result.stderr


def test_ratio_line_parser_rejects_a_missing_or_malformed_last_line():
    # The check above must be able to fail: a summary after the ratio, or a ratio that is no number.
    with pytest.raises(AssertionError):
        last_ratio("ratio: 1.000\ndone")
    with pytest.raises(ValueError):
        last_ratio("engine: 3 steps/s\nratio: fast")
    assert last_ratio("engine: 3 steps/s\nratio: 1.021\n") == pytest.approx(1.021)
