"""bench/minhash.py --quick, as the suite runs it: the dedup stage users run against datasketch on
the same real documents, at a small and a larger size. The speed goals live in the benchmark as
ratios (README, "Measured figures"); here only that both ratios come out, finite, and that the
two sides keep the same documents."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_run_reports_both_ratios_and_the_sides_agree(tmp_path):
    out = tmp_path / "minhash.json"
    done = subprocess.run([sys.executable, "bench/minhash.py", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["kiln_bench"] == "minhash" and result["quick"] is True
    for ratio in (result["ratio_small"], result["ratio_per_core_large"]):
        assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0
    small, large = result["sizes"]
    assert small["docs"] < large["docs"]
    for size in (small, large):
        assert size["stage_stats"]["documents_in"] == size["docs"]  # the stage ran on every document
        assert size["kept_stage"] == size["stage_stats"]["documents_out"]
        assert size["kept_agreement"] >= 0.99, size  # the same documents kept by both sides
        assert size["planted_found_stage"] >= 0.95 and size["planted_found_datasketch"] >= 0.95, size
        assert math.isfinite(size["ratio"]) and math.isfinite(size["ratio_per_core"])
