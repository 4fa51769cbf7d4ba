"""Where the runs of a sweep execute (run_all_experiments.py's experiments × seeds, tools/ablate_prompts.py's cells ×
seeds), chosen by --launcher:

- local, --max-parallel 1 (the default): one after another in this process, as before;
- local, --max-parallel N: N runs at a time, each its own process; on a machine with GPUs each gets one
  (CUDA_VISIBLE_DEVICES), on a CPU machine N CPU runs;
- submitit: every run one job of a SLURM job array, submitted and scheduled by submitit and SLURM (with
  --submitit-local, submitit's local executor runs the jobs as processes on this machine: the same code path
  without a cluster, which is how the tests run it).

The caller waits, sees the runs done, running and failed, and gets each run's metrics.json (None for a failed run,
whose log is named). No scheduler of the project's own: a thread pool or submitit does the scheduling.
"""

import importlib.util
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from clip_adapt.base import UserError
from clip_adapt.runner import REPO, error_line, read_metrics, run_for_metrics

LAUNCHERS = ("local", "submitit")
POLL_SECONDS = 5.0


@dataclass
class Run:
    script: str         # the experiment script's name, e.g. E3_shallow_vpt
    argv: list[str]     # its flags, --output-dir excepted
    out_dir: Path       # it writes into out_dir/<script>/
    label: str          # how the logs name it


def add_launcher_flags(parser):
    group = parser.add_argument_group("where the runs execute")
    group.add_argument("--launcher", default="local", choices=LAUNCHERS,
                       help="local: on this machine; submitit: one SLURM job per run (a job array)")
    group.add_argument("--max-parallel", type=int, default=1,
                       help="runs at a time: local, one GPU each (or N CPU runs); submitit, the array's "
                            "parallelism")
    group.add_argument("--submitit-local", action="store_true",
                       help="with --launcher submitit: submitit's local executor instead of SLURM (no cluster)")
    group.add_argument("--slurm-partition", help="the SLURM partition to submit to")
    group.add_argument("--slurm-time", type=int, default=60, metavar="MINUTES", help="each job's time limit")
    group.add_argument("--gpus-per-job", type=int, default=1, help="GPUs per SLURM job (0 on a CPU partition)")
    group.add_argument("--slurm-extra", default="", metavar="'--KEY=VALUE ...'",
                       help="further sbatch options, e.g. '--account=lab --qos=short'")
    return parser


LAUNCHER_FLAGS = ("launcher", "max_parallel", "submitit_local", "slurm_partition", "slurm_time", "gpus_per_job",
                  "slurm_extra")


def check_launcher_flags(args) -> None:
    if args.max_parallel < 1:
        raise UserError("--max-parallel must be at least 1")
    if args.launcher == "submitit":
        if importlib.util.find_spec("submitit") is None:
            raise UserError("--launcher submitit needs the submitit package: pip install submitit")
    elif args.submitit_local:
        raise UserError("--submitit-local goes with --launcher submitit")
    slurm_extra_options(args.slurm_extra)   # a malformed string fails now, not at submission


def slurm_extra_options(text: str) -> dict[str, str]:
    """'--account=lab --qos=short' as submitit's slurm_additional_parameters: {'account': 'lab', 'qos': 'short'}."""
    options = {}
    for word in shlex.split(text):
        key, equals, value = word.removeprefix("--").partition("=")
        if not word.startswith("--") or not equals or not key:
            raise UserError(f"--slurm-extra takes sbatch options as --key=value, got '{word}'")
        options[key.replace("-", "_")] = value
    return options


def script_command(script: str, argv: list[str], out_dir: str, root: str | Path = REPO) -> list[str]:
    """The command line that runs one experiment script into out_dir, as a process of its own."""
    return [sys.executable, str(Path(root) / f"{script}.py"), *argv, "--output-dir", out_dir]


def run_as_process(script: str, argv: list[str], out_dir: str, root: str = str(REPO)) -> str:
    """One run in a process of its own (a local slot or a submitit job). Raises when the run fails, so that the
    scheduler records the job as failed."""
    code = subprocess.run(script_command(script, argv, out_dir, root), cwd=root).returncode
    if code != 0:
        raise RuntimeError(f"{script} exited with code {code}")
    return str(Path(out_dir) / script / "metrics.json")


def launch(runs: list[Run], args) -> list[tuple[dict | None, str]]:
    """Each run's (metrics, why it failed), in the order given; metrics None where it failed, with its error
    line or the path of its log."""
    if not runs:
        return []
    if args.launcher == "submitit":
        return launch_submitit(runs, args)
    if args.max_parallel > 1:
        return launch_local_processes(runs, args.max_parallel)
    results = []
    for run in runs:
        with error_line() as reason:
            metrics = run_for_metrics(run.script, run.argv, run.out_dir, run.label)
        results.append((metrics, reason[0] if reason else ""))
    return results


def launch_local_processes(runs: list[Run], slots: int) -> list[tuple[dict | None, str]]:
    """`slots` runs at a time, each a process with its output in <out_dir>/<script>.log; on a machine with GPUs
    each slot has one GPU of its own."""
    import torch
    gpus = torch.cuda.device_count()
    free_slots = list(range(slots))

    def one(run: Run) -> tuple[dict | None, str]:
        slot = free_slots.pop()
        env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": str(slot % gpus)} if gpus else {})}
        log = run.out_dir / f"{run.script}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        started = time.time()
        try:
            with open(log, "w") as output:
                code = subprocess.run(script_command(run.script, run.argv, str(run.out_dir)), cwd=REPO, env=env,
                                      stdout=output, stderr=subprocess.STDOUT).returncode
        finally:
            free_slots.append(slot)
        metrics = read_metrics(run.out_dir / run.script / "metrics.json", started) if code == 0 else None
        print(f"{run.label}: {'done' if metrics else f'failed (exit {code}), log {log}'}", flush=True)
        return metrics, "" if metrics else f"exit code {code}, see {log}"

    print(f"running {len(runs)} runs, {slots} at a time" + (f" on {gpus} GPUs" if gpus else ""), flush=True)
    with ThreadPoolExecutor(slots) as pool:
        return list(pool.map(one, runs))


def launch_submitit(runs: list[Run], args) -> list[tuple[dict | None, str]]:
    """A SLURM job array through submitit (or its local executor); waits, reporting done, running and failed."""
    import submitit
    log_dir = Path(args.output_dir) / "submitit_logs"
    executor = submitit.AutoExecutor(folder=log_dir, cluster="local" if args.submitit_local else None)
    executor.update_parameters(timeout_min=args.slurm_time, gpus_per_node=args.gpus_per_job if not
                               args.submitit_local else 0, name="clip_adapt", slurm_array_parallelism=args.max_parallel,
                               slurm_partition=args.slurm_partition,
                               slurm_additional_parameters=slurm_extra_options(args.slurm_extra))
    # The jobs import this package: make sure they find it whatever folder SLURM starts them in.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    started = time.time()
    jobs = executor.map_array(run_as_process, [r.script for r in runs], [r.argv for r in runs],
                              [str(r.out_dir) for r in runs])
    print(f"submitted {len(jobs)} jobs ({'local executor' if args.submitit_local else 'SLURM'}), job "
          f"{jobs[0].job_id.split('_')[0]}; logs in {log_dir}", flush=True)
    wait_for(jobs)
    results = []
    for run, job in zip(runs, jobs):
        metrics = None if job.exception() is not None else read_metrics(Path(job.result()), started)
        if metrics is None:
            print(f"error: {run.label} failed: job {job.job_id}, log {job.paths.stderr}", file=sys.stderr)
        results.append((metrics, "" if metrics else f"job {job.job_id} failed, see {job.paths.stderr}"))
    return results


def wait_for(jobs) -> None:
    """Until every job has ended, a line whenever the counts of done, running and failed jobs change. (A job's
    own error is what marks it failed: submitit's local executor reports a failed job as FINISHED.)"""
    last = None
    while True:
        ended = [job for job in jobs if job.done()]
        failed = sum(job.exception() is not None for job in ended)
        running = sum(job.state == "RUNNING" for job in jobs if not job.done())
        counts = (len(ended), running, failed)
        if counts != last:
            print(f"jobs: {len(ended) - failed} done, {running} running, {failed} failed, "
                  f"{len(jobs) - len(ended) - running} waiting", flush=True)
            last = counts
        if len(ended) == len(jobs):
            return
        time.sleep(POLL_SECONDS)
