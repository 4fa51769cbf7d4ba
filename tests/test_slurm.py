"""Sweeps on a real SLURM: a single-node cluster on this machine (tools/start_slurm.sh: munged, MariaDB, slurmdbd,
slurmctld, slurmd), the jobs submitted with sbatch through submitit as a user's would be. The slow tier holds
the runs on the cluster; the fast tier the parts that need none (the sbatch refusal lines, the rendezvous from
SLURM's variables, the checkpoint that stops a run for its resume state).

Where SLURM cannot be installed or started (not root, no apt-get), the cluster tests skip with the reason; with
CLIP_ADAPT_REQUIRE_SLURM=1 (as .ci/run sets) they fail instead."""

import csv
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from types import SimpleNamespace

import pytest
from conftest import REPO, run_process, run_script
from test_scripts import assert_one_process_trains_alike, comparable, metrics_of

from clip_adapt.launch import ScriptJob, distributed_environment, sbatch_refusal

PARTITION = "debug"   # tools/start_slurm.sh's, no GPUs
FAST = ["--smoke", "--epochs", 1, "--noise-levels", 0]
ON_SLURM = ["--launcher", "submitit", "--slurm-partition", PARTITION, "--gpus-per-job", 0]
# A run long enough (about 1,000 optimiser steps) to be signalled while it trains, resumable after any step.
LONG_RUN = ["--smoke", "--device", "cpu", "--epochs", 1000, "--patience", 1000, "--lr", 1e-3, "--checkpoint-every",
            0, "--noise-levels", 0]


@pytest.fixture(scope="module")
def slurm():
    """The single-node cluster, started (and installed, where this machine allows) by tools/start_slurm.sh."""
    started = time.time()
    done = subprocess.run(["bash", str(REPO / "tools" / "start_slurm.sh")], capture_output=True, text=True,
                          timeout=600)
    if done.returncode == 3 and not os.environ.get("CLIP_ADAPT_REQUIRE_SLURM"):
        pytest.skip(done.stderr.strip().splitlines()[-1])
    assert done.returncode == 0, f"tools/start_slurm.sh failed:\n{done.stdout}{done.stderr}"
    print(f"{done.stdout.strip()} ({time.time() - started:.1f} s with the check)")


def submitted_job(stdout: str) -> str:
    return re.search(r"submitted \d+ jobs \(SLURM\), job (\d+)", stdout).group(1)


def sacct(job: str, *fields: str, steps: bool = False, duplicates: bool = False) -> list[dict]:
    """sacct's rows for a job (its array tasks each a row; with steps, their job steps too; with duplicates, every
    run of a requeued job)."""
    out = subprocess.run(["sacct", "-j", job, "--parsable2", "-o", ",".join(("JobID", *fields)),
                          *([] if steps else ["-X"]), *(["-D"] if duplicates else [])],
                         capture_output=True, text=True, check=True).stdout
    names, *rows = out.strip().splitlines()
    return [dict(zip(names.split("|"), row.split("|"))) for row in rows]


def rows_of(path, key: str) -> dict[str, dict]:
    with open(path, newline="") as f:
        return {row[key]: row for row in csv.DictReader(f)}


def assert_same_table(ours: dict, local: dict, columns) -> None:
    """Two summary tables, row by row, to 1e-6 in every number."""
    assert set(ours) == set(local)
    for name in local:
        for column in columns:
            mine, theirs = ours[name][column], local[name][column]
            if theirs == "":
                assert mine == "", (name, column)
            else:
                assert float(mine) == pytest.approx(float(theirs), abs=1e-6), (name, column)


def start_sweep(*flags, out_dir) -> tuple[subprocess.Popen, str]:
    """run_all_experiments.py in the background, its console in <out_dir>.console; (the process, its SLURM job
    id) once it has submitted."""
    console = out_dir.parent / f"{out_dir.name}.console"
    with open(console, "w") as log:   # the child keeps its own copy of the file
        process = subprocess.Popen([sys.executable, "run_all_experiments.py", *map(str, flags), "--output-dir",
                                    str(out_dir)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        found = re.search(r"submitted \d+ jobs \(SLURM\), job (\d+)", console.read_text())
        if found:
            return process, found.group(1)
        time.sleep(0.2)
    raise AssertionError(f"no job submitted:\n{console.read_text()}")


def finish(process: subprocess.Popen, out_dir) -> tuple[int, str]:
    """The sweep's exit code and console."""
    code = process.wait(timeout=600)
    return code, (out_dir.parent / f"{out_dir.name}.console").read_text()


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def squeue(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.strip()


# --------------------------------------------------------------------------- on the cluster

SUMMARY_COLUMNS = ("test_accuracy_mean", "test_accuracy_std", "train_accuracy_mean", "best_epoch_mean",
                   "epochs_run_mean", "trainable_params")


@pytest.mark.slow
def test_slurm_sweep_is_a_job_array_one_at_a_time_with_the_local_summary(slurm, tmp_path):
    """2 seeds x 2 experiments as a 4-task array, --max-parallel 1 its concurrency limit (%1): the tasks run one
    after another, each logs where the docs say, and summary.csv equals the local launcher's."""
    sweep = [*FAST, "--seeds", 0, 1, "--experiments", "E2_linear_probe", "E3_shallow_vpt"]
    submitted = run_process("run_all_experiments.py", *sweep, *ON_SLURM, "--max-parallel", 1,
                            "--output-dir", tmp_path / "slurm")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job = submitted_job(submitted.stdout)
    logs = tmp_path / "slurm" / "submitit_logs"
    assert "#SBATCH --array=0-3%1" in (logs / f"{job}_submission.sh").read_text()
    tasks = sacct(job, "State", "Start", "End", "Partition")
    assert [t["State"] for t in tasks] == ["COMPLETED"] * 4 and {t["Partition"] for t in tasks} == {PARTITION}
    spans = sorted((datetime.fromisoformat(t["Start"]), datetime.fromisoformat(t["End"])) for t in tasks)
    assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:])), spans   # never two at once
    for task, label in enumerate(["E2_linear_probe", "E3_shallow_vpt"] * 2):
        assert f"{label}: test accuracy" in (logs / f"{job}_{task}_0_log.out").read_text()

    run_script("run_all_experiments.py", *sweep, "--output-dir", tmp_path / "local", expect_exit=0)
    assert_same_table(rows_of(tmp_path / "slurm" / "summary.csv", "experiment"),
                      rows_of(tmp_path / "local" / "summary.csv", "experiment"), SUMMARY_COLUMNS)
    assert (tmp_path / "slurm" / "report.html").exists()


@pytest.mark.slow
def test_slurm_prompt_grid_names_the_failed_cell_and_a_rerun_runs_only_it(slurm, tmp_path):
    """A 2-cell prompt grid as a job array: the cell that fails (a padding wider than the 32 px smoke image) is
    named with its log, which holds its error; the rerun submits that cell alone; the grid equals the local one."""
    grid = [*FAST, "--counts", 1, "--layers", 0, "--positions", "front", "--types", "token", "padding"]
    failing = run_process("tools/ablate_prompts.py", *grid, *ON_SLURM, "--pad-size", 100,
                          "--output-dir", tmp_path / "slurm")
    assert failing.returncode == 1
    job = submitted_job(failing.stdout)
    log = tmp_path / "slurm" / "submitit_logs" / f"{job}_1_0_log.err"
    assert f"error: padding (seed 0) failed: job {job}_1, log {log}" in failing.stderr
    assert "token_layer0_n1_front (seed 0) failed" not in failing.stderr
    assert "error: " in log.read_text() and "exited with code 2" in log.read_text()   # the run's own error line
    assert [t["State"] for t in sacct(job, "State")] == ["COMPLETED", "FAILED"]

    fixed = run_process("tools/ablate_prompts.py", *grid, *ON_SLURM, "--pad-size", 2,
                        "--output-dir", tmp_path / "slurm")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert "token_layer0_n1_front (seed 0): finished before, not rerun" in fixed.stdout
    assert "submitted 1 jobs (SLURM)" in fixed.stdout

    run_script("tools/ablate_prompts.py", *grid, "--pad-size", 2, "--output-dir", tmp_path / "local",
               expect_exit=0)
    assert_same_table(rows_of(tmp_path / "slurm" / "ablation.csv", "cell"),
                      rows_of(tmp_path / "local" / "ablation.csv", "cell"),
                      ("test_accuracy_mean", "train_accuracy_mean", "trainable_params"))


@pytest.mark.slow
def test_slurm_cancelled_run_is_reported_as_cancelled_not_done(slurm, tmp_path):
    out_dir = tmp_path / "sweep"
    process, job = start_sweep(*LONG_RUN, "--experiments", "E3_shallow_vpt", *ON_SLURM, out_dir=out_dir)
    wait_until((out_dir / "E3_shallow_vpt" / "checkpoint" / "last.pt").exists, 300, "the run to train")
    subprocess.run(["scancel", job], check=True)
    code, console = finish(process, out_dir)
    assert code == 1, console[-3000:]
    log = out_dir / "submitit_logs" / f"{job}_0_log.err"
    assert f"error: E3_shallow_vpt (seed 0) was cancelled (scancel): job {job}, log {log}" in console
    assert "0 done, 0 running, 1 failed" in console and "1 done" not in console
    assert sacct(job, "State")[0]["State"].startswith("CANCELLED")
    assert "**Failed:** E3_shallow_vpt" in (out_dir / "summary.md").read_text()
    assert not (out_dir / "summary.csv").exists() and not (out_dir / "E3_shallow_vpt" / "metrics.json").exists()


@pytest.mark.slow
def test_slurm_time_limit_signal_checkpoints_requeues_and_resumes_to_the_uninterrupted_metrics(slurm, tmp_path):
    """`scancel --signal=USR2`, the signal submitit has SLURM send 90 s before the time limit, mid-training: the run
    writes its resume state, submitit requeues the job, and the requeued job resumes it (--resume) to the
    metrics.json of a run never interrupted, apart from timings."""
    out_dir = tmp_path / "sweep"
    process, job = start_sweep(*LONG_RUN, "--experiments", "E3_shallow_vpt", *ON_SLURM, out_dir=out_dir)
    wait_until((out_dir / "E3_shallow_vpt" / "checkpoint" / "last.pt").exists, 300, "the run to train")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    # SLURM holds a requeued job for two minutes (its BeginTime); the cluster's administrator lets it go now.
    wait_until(lambda: "BeginTime" in squeue(job), 120, "the job to be requeued")
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
    code, console = finish(process, out_dir)
    assert code == 0, console[-3000:]

    runs = sacct(job, "State", duplicates=True)
    assert [r["State"] for r in runs] == ["REQUEUED", "COMPLETED"]
    output = (out_dir / "submitit_logs" / f"{job}_0_log.out").read_text()
    errors = (out_dir / "submitit_logs" / f"{job}_0_log.err").read_text()
    assert "Caught signal SIGUSR2" in errors and f"Requeued job {job}" in output   # submitit's lines
    assert "SIGTERM: stopped in epoch" in errors   # the run's own line: its resume state was written
    stopped_at = re.search(r"SIGTERM: stopped in epoch (\d+)", errors).group(1)
    assert re.search(rf"resuming at epoch {stopped_at}, batch \d+", output), output[-2000:]

    run_script("E3_shallow_vpt.py", *LONG_RUN, "--output-dir", tmp_path / "whole", expect_exit=0)
    resumed, whole = metrics_of(out_dir, "E3_shallow_vpt.py"), metrics_of(tmp_path / "whole", "E3_shallow_vpt.py")
    assert resumed["settings"]["resume"] and not whole["settings"]["resume"]
    assert comparable(resumed) == comparable(whole)
    assert whole["epochs_run"] == 1000


@pytest.mark.slow
def test_slurm_two_tasks_of_one_job_train_as_one_process_does(slurm, tmp_path):
    """--tasks-per-node 2: one run as one job whose two tasks srun starts, one process each, meeting through
    accelerate at the rendezvous built from SLURM's variables; the numbers of one process on the same batch."""
    flags = ["--smoke", "--lr", 1e-2, "--batch-size", 6, "--epochs", 2, "--noise-levels", 0]
    submitted = run_process("run_all_experiments.py", *flags, "--experiments", "E6_full_finetune", *ON_SLURM,
                            "--nodes", 1, "--tasks-per-node", 2, "--output-dir", tmp_path / "slurm")
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job = submitted_job(submitted.stdout)
    step = [row for row in sacct(job, "State", "NTasks", steps=True) if row["JobID"] == f"{job}.0"]
    assert step == [{"JobID": f"{job}.0", "State": "COMPLETED", "NTasks": "2"}]
    two = metrics_of(tmp_path / "slurm", "E6_full_finetune.py")
    assert two["num_processes"] == 2
    assert_one_process_trains_alike(two, flags, tmp_path / "one")


@pytest.mark.slow
def test_slurm_gpu_request_on_a_partition_without_gpus_is_one_line_naming_the_flag(slurm, tmp_path):
    """The default --gpus-per-job 1 on the CPU partition: sbatch refuses, and the sweep says so in one line with
    the flag to change, exit 2, no traceback, nothing submitted or left behind."""
    refused = run_process("run_all_experiments.py", "--smoke", "--seeds", 0, 1, "--experiments", "E1", "E2",
                          "--launcher", "submitit", "--slurm-partition", PARTITION, "--output-dir", tmp_path)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        "error: sbatch refused the jobs (Invalid generic resource (gres) specification): the jobs ask for 1 GPU(s) "
        "each (--gpus-per-job 1): on a partition without GPUs pass --gpus-per-job 0, or a GPU partition with "
        "--slurm-partition"]
    assert not (tmp_path / "submitit_logs").exists() and not (tmp_path / "summary.md").exists()


# --------------------------------------------------------------------------- no cluster needed

@pytest.mark.parametrize("said, flag", [
    ("sbatch: error: Invalid generic resource (gres) specification", "pass --gpus-per-job 0, or a GPU partition "
                                                                     "with --slurm-partition"),
    ("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission failed: Invalid "
     "partition name specified", "choose another --slurm-partition"),
    ("sbatch: error: Batch job submission failed: More processors requested than permitted", "fewer --tasks-per-node"),
    ("sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
     "a shorter --slurm-time"),
    ("sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
     "--slurm-extra '--account=NAME'"),
    ("sbatch: unrecognized option '--bogus=1'\nTry \"sbatch --help\" for more information",
     "--slurm-extra holds an option sbatch does not take"),
    ("sbatch: error: something new", "change the flag it names: --slurm-partition"),
])
def test_sbatch_refusals_become_one_line_naming_the_flag(said, flag):
    """What SLURM 22.05's sbatch said to each of these (seen on tools/start_slurm.sh's cluster), as one line."""
    line = sbatch_refusal(said, SimpleNamespace(gpus_per_job=1))
    assert "\n" not in line and flag in line
    assert line.startswith("sbatch refused the jobs (") and "sbatch:" not in line and "error:" not in line


def test_slurm_rendezvous_comes_from_slurm_environment(monkeypatch):
    """Task 3 of a 2-node x 2-task job: accelerate's env:// rendezvous from SLURM's variables (through submitit's
    TorchDistributedEnvironment), the same first node and port in every task of the job; none for one task."""
    slurm_task = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[07-08]",
                  "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "2", "SLURM_NTASKS": "4", "SLURM_PROCID": "3",
                  "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in slurm_task.items():
        monkeypatch.setenv(name, value)
    environment = distributed_environment()
    assert {k: v for k, v in environment.items() if k != "MASTER_PORT"} == {
        "MASTER_ADDR": "gpu07", "RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert distributed_environment()["MASTER_PORT"] == environment["MASTER_PORT"]   # task 0 listens there
    assert 20000 <= int(environment["MASTER_PORT"]) <= 60000
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert distributed_environment() == {}


# A stand-in for an experiment script: it records the signals it gets, stops on SIGTERM as the training loop does.
STAND_IN = """
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[sys.argv.index("--output-dir") + 1])
out.mkdir(parents=True, exist_ok=True)
def stop(number, frame):
    (out / "stopped").write_text(signal.Signals(number).name)
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
(out / "started").write_text("")
time.sleep(60)
"""


def test_slurm_checkpoint_stops_the_run_for_its_resume_state_and_resubmits_it_with_resume(tmp_path, monkeypatch):
    """What happens in a job on SLURM's time-limit signal, which reaches every process of the job: the run's
    process ignores it; submitit's handler calls ScriptJob.checkpoint, which stops the run with SIGTERM (the
    signal on which the training loop writes its resume state) and returns the same run with --resume."""
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    (tmp_path / "StandIn.py").write_text(STAND_IN)
    out_dir = tmp_path / "out"
    job, resubmitted = ScriptJob(), []

    def submitit_handler(number, frame):   # what submitit's does: checkpoint, requeue, leave the job
        resubmitted.append(job.checkpoint("StandIn", ["--seed", "1"], str(out_dir), str(tmp_path)))
        raise SystemExit(-1)

    def signal_every_process():   # as SLURM does: the job's processes, the run's included
        wait_until((out_dir / "started").exists, 30, "the stand-in to start")
        job.child.send_signal(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        threading.Thread(target=signal_every_process, daemon=True).start()
        with pytest.raises(SystemExit):
            job("StandIn", ["--seed", "1"], str(out_dir), str(tmp_path))
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert (out_dir / "stopped").read_text() == "SIGTERM"   # it outlived SIGUSR2 and stopped on SIGTERM
    (again,) = resubmitted
    assert again.args == ("StandIn", ["--seed", "1", "--resume"], str(out_dir), str(tmp_path))
    assert isinstance(again.function, ScriptJob) and again.function.child is None   # nothing unpicklable in it
    assert ScriptJob().checkpoint("StandIn", ["--resume"], str(out_dir)).args[1] == ["--resume"]


def test_slurm_flags_refused_where_they_cannot_apply(tmp_path, capsys, monkeypatch):
    run_script("run_all_experiments.py", "--smoke", "--tasks-per-node", 2, "--output-dir", tmp_path, expect_exit=2)
    assert "--nodes and --tasks-per-node go with --launcher submitit" in capsys.readouterr().err
    monkeypatch.setenv("PATH", str(tmp_path))   # no sbatch here
    run_script("run_all_experiments.py", "--smoke", "--launcher", "submitit", "--output-dir", tmp_path,
               expect_exit=2)
    assert "there is no sbatch on this machine's PATH" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())   # refused before anything was written
