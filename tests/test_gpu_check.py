"""tools/gpu_check.sh, the GPU check, dry-run on the CPU: every step runs at --smoke size and is recorded."""

import json
import os
import subprocess

import pytest

from conftest import REPO

STEPS = ["env", "cuda_tests", "bench_batch_32", "max_batch", "bench_largest_batch", "syncs", "suite",
         "suite_compile"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_records_it(tmp_path):
    # One experiment keeps it short: every step's plumbing is the same for each.
    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path), "--dry-run", "--experiments",
                             "E2_linear_probe"], cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(results["steps"]) == STEPS
    assert all(step["status"] == "ok" for step in results["steps"].values()), results["steps"]
    assert results["env"]["packages"]["torch"] and results["env"]["cuda_available"] is False
    assert [r["experiment"] for r in results["bench_batch_32"]["experiments"]] == ["E2_linear_probe"]
    assert results["max_batch"]["largest_batch"] == 4 == results["bench_largest_batch"]["batch_size"]
    assert results["syncs"]["exit_code"] == 0 and results["syncs"]["syncs"] is None   # counted on CUDA only
    for suite in ("suite", "suite_compile"):
        assert results[suite]["exit_code"] == 0 and list(results[suite]["experiments"]) == ["E2_linear_probe"]
        phases = results[suite]["phases_s"]
        assert phases["training"] > 0 and phases["reports"] > 0 and phases["outside_experiments"] > 0
    assert results["suite_compile"]["compile"] is True
    assert "gpu_check summary" in (tmp_path / "gpu_check.log").read_text()


def test_gpu_check_refuses_a_missing_data_folder_in_one_line(tmp_path):
    result = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out"), "--data", str(tmp_path / "none")],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr
