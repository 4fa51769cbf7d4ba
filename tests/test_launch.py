"""Past one machine: sweeps as submitit jobs (its local executor stands in for SLURM), and one training run across
two "nodes" on loopback."""

import csv
import subprocess
import sys

import pytest
from conftest import REPO, run_process, run_script
from test_any_data import free_port, launch_failure
from test_scripts import assert_one_process_trains_alike, metrics_of

from clip_adapt.base import UserError
from clip_adapt.launch import slurm_extra_options

FAST = ["--smoke", "--epochs", 1, "--noise-levels", 0]
COMPARED = ("test_accuracy_mean", "test_accuracy_std", "train_accuracy_mean", "best_epoch_mean", "epochs_run_mean",
            "trainable_params")


def summary_rows(folder) -> dict[str, dict]:
    with open(folder / "summary.csv", newline="") as f:
        return {row["experiment"]: {k: row[k] for k in COMPARED} for row in csv.DictReader(f)}


@pytest.mark.slow
def test_submitit_sweep_writes_the_summary_of_a_local_sweep(tmp_path):
    sweep = [*FAST, "--seeds", 0, 1, "--experiments", "E2_linear_probe", "E3_shallow_vpt"]
    run_script("run_all_experiments.py", *sweep, "--output-dir", tmp_path / "local", expect_exit=0)
    submitted = run_process("run_all_experiments.py", *sweep, "--launcher", "submitit", "--submitit-local",
                            "--max-parallel", 2, "--output-dir", tmp_path / "submitit")
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    assert "submitted 4 jobs (local executor)" in submitted.stdout
    assert summary_rows(tmp_path / "submitit") == summary_rows(tmp_path / "local")
    assert (tmp_path / "submitit" / "report.html").exists()


@pytest.mark.slow
def test_a_failed_cell_is_named_and_a_resubmission_runs_only_it(tmp_path):
    grid = [*FAST, "--counts", 1, "--layers", 0, "--positions", "front", "--types", "token", "padding",
            "--launcher", "submitit", "--submitit-local", "--output-dir", tmp_path]
    failing = run_process("tools/ablate_prompts.py", *grid, "--pad-size", 100)   # wider than the 32 px image
    assert failing.returncode == 1
    assert "error: padding (seed 0) failed: job" in failing.stderr and ".err" in failing.stderr
    assert "failed: padding (seed 0)" in failing.stderr and "token_layer0_n1_front" not in failing.stderr

    fixed = run_process("tools/ablate_prompts.py", *grid, "--pad-size", 2)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "token_layer0_n1_front (seed 0): finished before, not rerun" in fixed.stdout
    assert "submitted 1 jobs" in fixed.stdout
    assert "| padding |" in (tmp_path / "ablation.md").read_text()


@pytest.mark.parametrize("text, expected", [("", {}), ("--account=lab --qos=short", {"account": "lab", "qos": "short"}),
                                            ("--mail-type=END", {"mail_type": "END"})])
def test_slurm_extra_becomes_sbatch_options(text, expected):
    assert slurm_extra_options(text) == expected


def test_bad_launcher_flags_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="--slurm-extra takes sbatch options as --key=value"):
        slurm_extra_options("account lab")
    run_script("run_all_experiments.py", "--smoke", "--submitit-local", "--output-dir", tmp_path, expect_exit=2)
    assert "--submitit-local goes with --launcher submitit" in capsys.readouterr().err


@pytest.mark.slow
def test_two_nodes_on_loopback_train_as_one_process_does(tmp_path):
    """`accelerate launch --num_machines 2 --machine_rank R` on two "nodes" (two launches on this machine, one
    process each, meeting on 127.0.0.1) gives the numbers of one process on the same global batch."""
    flags = ["--smoke", "--lr", 1e-2, "--batch-size", 6, "--epochs", 2, "--noise-levels", 0]
    port = free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2", "--machine_rank",
         str(rank), "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", "E6_full_finetune.py", *map(str, flags),
         "--output-dir", str(tmp_path / "two_nodes")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=600) for node in nodes]
    for node, (out, err) in zip(nodes, outputs):
        assert node.returncode == 0, launch_failure(subprocess.CompletedProcess([], node.returncode, out, err))
    two = metrics_of(tmp_path / "two_nodes", "E6_full_finetune.py")
    assert two["num_processes"] == 2
    assert_one_process_trains_alike(two, flags, tmp_path / "one")
