"""Smoke test of bench/bench_bf16.py (issue 25's speed targets): --quick runs every measurement and
prints one table row per target. It checks the rows, not the speeds (tiny sizes, a shared machine).
Skipped only on a CPU without AMX-BF16/AVX512-BF16 (training.auto_dtype's rule), where bfloat16 is
emulated and the benchmark says nothing.
Run: pytest tests/test_bench_bf16.py -q
"""
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import training  # noqa: E402

ROWS = [  # (start of the measurement, baseline, target)
    ("train step demo 2x32", "float32", 2.0),
    ("train step small 2x32", "float32", 2.0),
    ("rms_norm fwd+bwd", "stock F.rms_norm bf16", 1.0),
    ("rms_norm fwd+bwd", "ours float32", 1.5),
    ("rope fwd+bwd", "stock Meta RoPE bf16", 1.0),
    ("rope fwd+bwd", "ours float32", 1.5),
    ("attention fwd+bwd", "stock SDPA(enable_gqa) bf16", 1.0),
    ("attention fwd+bwd", "ours float32", 1.5),
    ("decode batch 4", "ours float32", 1.5),
    ("decode batch 4", "transformers bf16", 1.5),
]


def test_bench_bf16_quick_prints_every_row(tmp_path, capsys, llama2_extension):
    dtype, why = training.auto_dtype("cpu", False, training.cpu_capabilities())
    if dtype != "bfloat16":
        pytest.skip(f"bench_bf16 measures bfloat16 hardware: {why}")
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_bf16
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = bench_bf16.main(["--quick", "--checkpoint", str(tmp_path / "none"),
                               "--json", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    assert text.startswith("cpu: ") and "amx_bf16=" in text and "threads: 1 " in text
    assert json.loads((tmp_path / "b.json").read_text())["rows"] == out["rows"]
    assert len(out["rows"]) == len(ROWS)
    table = text[text.index("measurement "):].splitlines()
    met = sum(r["met"] for r in out["rows"])
    assert len(table) == 1 + len(ROWS) + 1 and table[-1] == f"{met}/{len(ROWS)} targets met"
    for (name, base, target), r, line in zip(ROWS, out["rows"], table[1:]):
        assert r["measurement"].startswith(name) and r["baseline"] == base and r["target"] == target
        assert r["bf16"] > 0 and r["baseline_value"] > 0 and r["ratio"] > 0
        assert r["met"] == (r["ratio"] >= target)
        assert line.startswith(r["measurement"]) and f"| {base} " in line
        assert line.endswith("| yes" if r["met"] else "| NO") and f">= {target:.1f}x" in line
