"""Where the runs of a sweep execute (run_all_experiments.py's experiments × seeds, tools/ablate_prompts.py's cells ×
seeds), chosen by --launcher:

- local, --max-parallel 1 (the default): one after another in this process, as before;
- local, --max-parallel N: N runs at a time, each its own process; on a machine with GPUs each gets one
  (CUDA_VISIBLE_DEVICES), on a CPU machine N CPU runs;
- submitit: every run one job of a SLURM job array, submitted and scheduled by submitit and SLURM (with
  --submitit-local, submitit's local executor runs the jobs as processes on this machine: the same code path
  without a cluster, which is how the tests run it).

The caller waits, sees the runs done, running and failed, and gets each run's metrics.json (None for a failed,
cancelled or timed-out run, whose log is named). No scheduler of the project's own: a thread pool or submitit does
the scheduling. On SLURM, a run that gets the time-limit (or preemption) signal writes its resume state and is
requeued by submitit to continue with --resume (ScriptJob); with --nodes/--tasks-per-node, one run is one job of
several tasks that srun starts, meeting through accelerate. Tested against a real single-node SLURM
(tools/start_slurm.sh, tests/test_slurm.py; docs/past-one-machine.md).
"""

import contextlib
import io
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.helpers import Checkpointable, DelayedSubmission, TorchDistributedEnvironment

from clip_adapt.base import UserError
from clip_adapt.runner import REPO, error_line, read_metrics, run_for_metrics

LAUNCHERS = ("local", "submitit")
POLL_SECONDS = 5.0
# How long a run may take to write its resume state once told to stop: well within the 90 s submitit asks SLURM
# to leave between its signal and the kill.
STOP_SECONDS = 60.0


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
    group.add_argument("--gpus-per-job", type=int, default=1,
                       help="GPUs per SLURM job, on each of its nodes (0 on a partition without GPUs)")
    group.add_argument("--nodes", type=int, default=1,
                       help="with --launcher submitit: nodes per run; the run is one job whose tasks (--nodes x "
                            "--tasks-per-node) srun starts, one process of the run each, meeting through accelerate")
    group.add_argument("--tasks-per-node", type=int, default=1,
                       help="with --launcher submitit: processes per node of each run (one GPU each on GPU nodes: "
                            "then --gpus-per-job as many)")
    group.add_argument("--slurm-extra", default="", metavar="'--KEY=VALUE ...'",
                       help="further sbatch options, e.g. '--account=lab --qos=short'")
    return parser


LAUNCHER_FLAGS = ("launcher", "max_parallel", "submitit_local", "slurm_partition", "slurm_time", "gpus_per_job",
                  "nodes", "tasks_per_node", "slurm_extra")


def check_launcher_flags(args) -> None:
    for flag in ("max_parallel", "nodes", "tasks_per_node", "slurm_time"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.launcher == "submitit":
        if not args.submitit_local and shutil.which("sbatch") is None:
            raise UserError("--launcher submitit submits to SLURM, but there is no sbatch on this machine's PATH: "
                            "run it where sbatch is (a login node), or add --submitit-local to run the jobs here")
        if args.submitit_local and args.nodes > 1:
            raise UserError("--submitit-local runs the jobs on this machine: --nodes 1")
    else:
        if args.submitit_local:
            raise UserError("--submitit-local goes with --launcher submitit")
        if args.nodes > 1 or args.tasks_per_node > 1:
            raise UserError("--nodes and --tasks-per-node go with --launcher submitit; on one machine, "
                            "`accelerate launch --num_processes N` runs a run as N processes (docs/several-gpus.md)")
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


def preemption_signal() -> int:
    """The signal submitit asks SLURM to send before the time limit, and on which it checkpoints and requeues:
    SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL (submitit's own setting) names another."""
    return getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG.removeprefix("SIG"))


def ignore_preemption_signal() -> None:
    """In the run's process, before it starts: SLURM sends its signal to every process of the job step, and the
    run must not die of it (SIGUSR2 ends a process by default) but stop when ScriptJob.checkpoint tells it to,
    the way it resumes from."""
    signal.signal(preemption_signal(), signal.SIG_IGN)


def distributed_environment() -> dict[str, str]:
    """In a job of several tasks, torch.distributed's env:// rendezvous (which accelerate reads) from SLURM's
    variables, by submitit's TorchDistributedEnvironment: MASTER_ADDR the job's first node (SLURM_JOB_NODELIST),
    MASTER_PORT drawn from the job id (the same in every task), RANK SLURM_PROCID, WORLD_SIZE SLURM_NTASKS,
    LOCAL_RANK SLURM_LOCALID. Nothing in a job of one task: the run is one process, as when run plainly."""
    if submitit.JobEnvironment().num_tasks == 1:
        return {}
    rendezvous = TorchDistributedEnvironment()
    return {"MASTER_ADDR": rendezvous.master_addr, "MASTER_PORT": str(rendezvous.master_port),
            "RANK": str(rendezvous.rank), "WORLD_SIZE": str(rendezvous.world_size),
            "LOCAL_RANK": str(rendezvous.local_rank), "LOCAL_WORLD_SIZE": str(rendezvous.local_world_size)}


def stop_for_requeue(child: subprocess.Popen | None) -> None:
    """SIGTERM to the run (the training loop stops after the step under way and writes its resume state, then
    exits), and waits for it to end; SIGKILL after STOP_SECONDS. Waits with os.waitpid, not Popen.wait: this runs
    in a signal handler that may have interrupted a Popen.wait holding the Popen's lock."""
    if child is None:
        return
    with contextlib.suppress(ProcessLookupError):
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_SECONDS
    try:
        while time.monotonic() < deadline:
            if os.waitpid(child.pid, os.WNOHANG)[0]:
                return
            time.sleep(0.1)
        child.kill()
        os.waitpid(child.pid, 0)
    except ChildProcessError:   # already reaped
        pass


class ScriptJob(Checkpointable):
    """One run as a submitit job: the experiment script in a process of its own (in every task of the job, with
    the rendezvous of distributed_environment, where the job has several). Raises when the run fails, so that
    submitit records the job as failed.

    Checkpointable: on SLURM's signal before the time limit, or a preemption, submitit calls checkpoint(), which
    stops the run so that it writes its resume state, and requeues the job with the DelayedSubmission it returns:
    the same run with --resume, which continues exactly where it stopped."""

    def __init__(self):
        self.child = None   # the run's process while it runs (not pickled: checkpoint() resubmits a new ScriptJob)

    def __call__(self, script: str, argv: list[str], out_dir: str, root: str = str(REPO)) -> str:
        self.child = subprocess.Popen(script_command(script, argv, out_dir, root), cwd=root,
                                      env={**os.environ, **distributed_environment()},
                                      preexec_fn=ignore_preemption_signal)
        code = self.child.wait()
        if code != 0:
            raise RuntimeError(f"{script} exited with code {code}")
        return str(Path(out_dir) / script / "metrics.json")

    def checkpoint(self, script: str, argv: list[str], out_dir: str, root: str = str(REPO)) -> DelayedSubmission:
        print(f"{script}: stopping for a requeue (time limit or preemption); it continues with --resume", flush=True)
        stop_for_requeue(self.child)
        resumed = argv if "--resume" in argv else [*argv, "--resume"]
        return DelayedSubmission(ScriptJob(), script, resumed, out_dir, root)


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
    log_dir = Path(args.output_dir) / "submitit_logs"
    new_log_dir = not log_dir.exists()
    executor = submitit.AutoExecutor(folder=log_dir, cluster="local" if args.submitit_local else "slurm")
    executor.update_parameters(timeout_min=args.slurm_time, gpus_per_node=args.gpus_per_job if not
                               args.submitit_local else 0, name="clip_adapt", nodes=args.nodes,
                               tasks_per_node=args.tasks_per_node, slurm_array_parallelism=args.max_parallel,
                               slurm_partition=args.slurm_partition,
                               slurm_additional_parameters=slurm_extra_options(args.slurm_extra),
                               # A task that fails ends its job's other tasks at once (they would wait in the
                               # collectives), as `accelerate launch` ends its processes.
                               slurm_srun_args=["--kill-on-bad-exit=1"])
    # The jobs import this package: make sure they find it whatever folder SLURM starts them in.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    started = time.time()
    try:
        with contextlib.redirect_stderr(io.StringIO()):   # submitit prints sbatch's refusal before raising it
            jobs = executor.map_array(ScriptJob(), [r.script for r in runs], [r.argv for r in runs],
                                      [str(r.out_dir) for r in runs])
    except submitit.core.utils.FailedJobError as refusal:
        if new_log_dir:   # nothing was submitted: leave no folder behind
            shutil.rmtree(log_dir, ignore_errors=True)
        raise UserError(sbatch_refusal(str(refusal), args)) from None
    print(f"submitted {len(jobs)} jobs ({'local executor' if args.submitit_local else 'SLURM'}), job "
          f"{jobs[0].job_id.split('_')[0]}; logs in {log_dir}", flush=True)
    errors = wait_for(jobs)
    results = []
    for run, job in zip(runs, jobs):
        metrics = None if errors[job] is not None else read_metrics(Path(job.results()[0]), started)
        ended = "" if metrics is not None else ended_how(final_state(job, args), args)
        if ended:
            print(f"error: {run.label} {ended}: job {job.job_id}, log {job.paths.stderr}", file=sys.stderr)
        results.append((metrics, f"job {job.job_id} {ended}, see {job.paths.stderr}" if ended else ""))
    return results


def final_state(job, args, seconds: float = 60) -> str:
    """A SLURM job's state once SLURM has ended it. A job can leave its result before: a run that scancel's SIGTERM
    stops writes its error while SLURM still has the job as running (submitit's view of it can be older still)."""
    if not args.submitit_local:
        deadline = time.monotonic() + seconds
        while not job.watcher.is_done(job.job_id, mode="force") and time.monotonic() < deadline:
            time.sleep(1)
    return job.state


def ended_how(state: str, args) -> str:
    """How a job that left no metrics ended, from its SLURM state (sacct's; submitit's local executor has its own
    states, all of them 'failed' here)."""
    state = state.upper()
    if state.startswith("CANCELLED"):
        return "was cancelled (scancel)"
    if state == "TIMEOUT":
        return f"hit its time limit of {args.slurm_time} min (--slurm-time) and was not requeued"
    if state == "NODE_FAIL":
        return "was lost with its node (NODE_FAIL): resubmit it"
    if state == "OUT_OF_MEMORY":
        return "ran out of memory: ask for more with --slurm-extra '--mem=...'"
    if state == "PREEMPTED":
        return "was preempted and not requeued"
    return "failed"


# What sbatch says, and the flag that changes it (first match); account before partition: "Invalid account or
# account/partition combination specified".
SBATCH_FIXES = (
    ("generic resource", "the jobs ask for {gpus} GPU(s) each (--gpus-per-job {gpus}): on a partition without "
                         "GPUs pass --gpus-per-job 0, or a GPU partition with --slurm-partition"),
    ("account", "give an account of yours with --slurm-extra '--account=NAME' (sacctmgr show assoc user=$USER)"),
    ("qos", "give a QOS of yours with --slurm-extra '--qos=NAME'"),
    ("partition", "choose another --slurm-partition (sinfo lists them)"),
    ("time limit", "a shorter --slurm-time, within the partition's limit (sinfo -o '%P %l')"),
    ("node configuration is not available", "fewer --nodes, --tasks-per-node or --gpus-per-job, or another "
                                            "--slurm-partition (sinfo -o '%P %D %c %G' shows its nodes)"),
    ("processors", "fewer --tasks-per-node or --nodes, or another --slurm-partition (sinfo -o '%P %D %c' shows "
                   "its nodes and CPUs)"),
    ("option", "--slurm-extra holds an option sbatch does not take"),
)


def sbatch_refusal(message: str, args) -> str:
    """sbatch's error as one line naming the launcher flag to change."""
    lines = [line for line in message.splitlines() if line.strip()]
    said = "; ".join(line.split("error:", 1)[-1].strip().removeprefix("sbatch:").strip()
                     .removeprefix("Batch job submission failed:").strip()
                     for line in [line for line in lines if "error:" in line] or lines[:1])
    fix = next((fix for key, fix in SBATCH_FIXES if key in said.lower()),
               "change the flag it names: --slurm-partition, --slurm-time, --gpus-per-job, --nodes, --tasks-per-node "
               "or --slurm-extra")
    return f"sbatch refused the jobs ({said}): {fix.format(gpus=args.gpus_per_job)}"


def wait_for(jobs) -> dict:
    """Until every job has ended, a line whenever the counts of done, running and failed jobs change. Returns each
    job's error (None where it succeeded), asked once per job: submitit waits 15 s for the result of a job that left
    none (cancelled, killed) before it says so. (A job's own error is what marks it failed: submitit's local
    executor reports a failed job as FINISHED.)"""
    errors, last = {}, None
    while True:
        for job in jobs:
            if job not in errors and job.done():
                errors[job] = job.exception()
        failed = sum(error is not None for error in errors.values())
        running = sum(job.state == "RUNNING" for job in jobs if job not in errors)
        counts = (len(errors), running, failed)
        if counts != last:
            print(f"jobs: {len(errors) - failed} done, {running} running, {failed} failed, "
                  f"{len(jobs) - len(errors) - running} waiting", flush=True)
            last = counts
        if len(errors) == len(jobs):
            return errors
        time.sleep(POLL_SECONDS)
