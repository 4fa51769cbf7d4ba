"""tools/gpu_check.sh, the GPU check: its preparation (the data copy, the pinned wheels) and its dry run on the CPU,
where every step runs at --smoke size and is recorded."""

import importlib.metadata
import json
import os
import subprocess
import sys
import zipfile

import pytest
from conftest import REPO
from packaging.utils import canonicalize_name
from packaging.version import Version

from tools import gpu_check

STEPS = ["wheels", "env", "cuda_tests", "bench", "bench_compile", "e8_step", "syncs", "suite"]


def check(*args, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "tools/gpu_check.sh", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})


def make_wheel(folder, name: str, version: str, files: dict[str, str]):
    """A minimal valid wheel of pure-Python `files` ({path: text}), as pip builds one, RECORD included."""
    info = f"{name.replace('-', '_')}-{version}.dist-info"
    members = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    members[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*members, f"{info}/RECORD"])
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in members.items():
            wheel.writestr(member, text)
    return path


# --------------------------------------------------------------------------- the wheels

@pytest.fixture(scope="module")
def plan():
    return gpu_check.wheel_plan()


def test_the_wheel_plan_pins_every_needed_distribution_at_its_installed_version(plan):
    """What --prepare downloads: requirements.txt and all it needs under the GPU image's Python, each at the
    version installed here (where the tests pass), the CUDA stack and the image's compiled builds left to it."""
    assert plan["problems"] == [] and plan["python"].startswith("3.12")
    needed = {**plan["carry"], **{name: left["tested"] for name, left in plan["image"].items()}}
    for name, version in needed.items():
        assert Version(importlib.metadata.version(name)) == Version(version), name
    top = {canonicalize_name(r.name) for r in gpu_check.project_requirements()}
    assert top <= set(needed)
    # datasets' own needs (the issue: --no-deps left them unchecked) and pycocoevalcap's compiled one.
    assert {"pyarrow", "fsspec", "huggingface-hub", "dill", "multiprocess", "xxhash"} <= set(needed)
    assert {"pycocoevalcap", "pycocotools", "datasets", "transformers", "pywavelets"} <= set(plan["carry"])
    assert "torch" in plan["image"] and not any(gpu_check.in_cuda_stack(name) for name in plan["carry"])
    assert "numpy" in plan["image"]   # compiled, and the image has its own build
    for name in plan["carry"]:   # a compiled wheel travels only where the image has none of that distribution
        assert gpu_check.is_pure(name) or name not in gpu_check.IMAGE_PACKAGES, name


def test_pip_freeze_gives_the_versions_importlib_finds():
    frozen = gpu_check.freeze_versions()
    for name in ("transformers", "datasets", "pycocoevalcap", "torch"):
        assert Version(frozen[name]) == Version(importlib.metadata.version(name))


def test_a_requirement_the_machine_does_not_meet_is_named():
    """The env step's check on the GPU machine: with an older pyarrow there than datasets needs, it says so."""
    versions, edges = gpu_check.requirement_closure(
        gpu_check.project_requirements(), gpu_check.marker_environment(),
        version_of=lambda name: "20.0.0" if name == "pyarrow" else gpu_check.installed(name))
    problems = gpu_check.unsatisfied(versions, edges)
    assert len(problems) == 1 and problems[0].startswith("datasets needs pyarrow>=") and "found 20.0.0" in problems[0]
    assert gpu_check.unsatisfied(*gpu_check.requirement_closure(gpu_check.project_requirements(),
                                                                gpu_check.marker_environment())) == []


def test_prepared_wheels_are_the_versions_installed_here(plan):
    """.whl/ as bash tools/gpu_check.sh --prepare left it: one wheel per pinned distribution, at the version
    installed where these tests pass."""
    if not (gpu_check.WHEEL_FOLDER / "plan.json").exists():
        pytest.skip("no .whl/ prepared in this checkout: bash tools/gpu_check.sh --prepare")
    assert gpu_check.compare_wheels(gpu_check.WHEEL_FOLDER, plan["carry"]) == []
    assert json.loads((gpu_check.WHEEL_FOLDER / "plan.json").read_text())["carry"] == plan["carry"]


def test_wheels_that_differ_from_the_pins_are_named(tmp_path):
    make_wheel(tmp_path, "tqdm", "0.1.0", {})
    make_wheel(tmp_path, "seaborn", "0.13.2", {})
    make_wheel(tmp_path, "unasked", "1.0", {})
    make_wheel(tmp_path, "dill", "9.0", {})
    make_wheel(tmp_path, "dill", "9.1", {})
    problems = gpu_check.compare_wheels(tmp_path, {"tqdm": "4.70.1", "seaborn": "0.13.2", "dill": "9.0",
                                                   "datasets": "5.2.0"})
    assert sorted(problems) == ["datasets: no wheel for 5.2.0", "dill: 2 wheels (9.0, 9.1); keep one",
                                "tqdm: wheel 0.1.0, installed where the tests pass 4.70.1",
                                "unasked: wheel 1.0 is not among the pinned distributions"]


def test_a_slimmed_wheel_keeps_its_python_and_installs_where_only_what_differs_is_installed(tmp_path):
    """pycocoevalcap travels without its Java scorers; the machine installs the wheels whose version it lacks
    (here: a distribution it does not have), not those it holds at the same version."""
    folder = tmp_path / "wheels"
    folder.mkdir()
    probe = make_wheel(folder, "gpu-check-probe", "1.0", {"gpu_check_probe/__init__.py": "ANSWER = 42\n",
                                                          "gpu_check_probe/scorer.jar": "x" * 100_000})
    tqdm_version = importlib.metadata.version("tqdm")
    make_wheel(folder, "tqdm", tqdm_version, {"tqdm/__init__.py": "raise ImportError('not this one')\n"})
    assert gpu_check.slim_wheel(probe, gpu_check.SLIM_WHEELS["pycocoevalcap"]) > 50_000
    with zipfile.ZipFile(probe) as wheel:
        names = wheel.namelist()
        record = wheel.read("gpu_check_probe-1.0.dist-info/RECORD").decode()
    recorded = [line.split(",")[0] for line in record.splitlines()]
    assert "gpu_check_probe/scorer.jar" not in names + recorded
    assert "gpu_check_probe/__init__.py" in names and "gpu_check_probe/__init__.py" in recorded
    target = tmp_path / "site"
    args = type("Args", (), {"folder": str(folder), "target": str(target)})
    assert gpu_check.wheels(args) == {"installed": {"gpu-check-probe": {
        "wheel": probe.name, "version": "1.0", "machine_has": None}}, "already_there": ["tqdm"]}
    found = subprocess.run([sys.executable, "-c", "import gpu_check_probe; print(gpu_check_probe.ANSWER)"],
                           env={**os.environ, "PYTHONPATH": str(target)}, capture_output=True, text=True)
    assert found.stdout.strip() == "42" and not (target / "tqdm").exists()


def test_prepare_refuses_a_missing_data_folder_in_one_line(tmp_path):
    result = check("--prepare", "--data", tmp_path / "none", timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr


def test_data_copy_is_real_files(tmp_path):
    """The device tool sends a link as a link: the copy follows them."""
    source = tmp_path / "source"
    for split in ("train", "test"):
        (source / split / "glioma").mkdir(parents=True)
        (source / split / "glioma" / "a.jpg").write_bytes(b"\xff\xd8 image")
    (source / "train" / "glioma" / "link.jpg").symlink_to(source / "test" / "glioma" / "a.jpg")
    assert gpu_check.copy_data(source, tmp_path / "copy") == (3, 3 * len(b"\xff\xd8 image"))
    copied = sorted(p for p in (tmp_path / "copy").rglob("*") if p.is_file())
    assert len(copied) == 3 and not any(p.is_symlink() for p in copied)


# --------------------------------------------------------------------------- the run

def test_gpu_check_refuses_a_missing_data_folder_in_one_line_and_in_its_log(tmp_path):
    result = check(tmp_path / "out", "--data", tmp_path / "none", timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "does not exist" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.log"]
    assert result.stderr in (tmp_path / "out" / "gpu_check.log").read_text()


def test_steps_past_the_budget_are_cut_from_the_end_and_recorded_as_not_run(tmp_path):
    """The cheap form of the dry run: with 25 s, env (20 s) runs, the CUDA tests (60 s more) and the suite do
    not, and each says why; the plan is in gpu_check.json before the first step runs."""
    result = check(tmp_path, "--dry-run", "--budget", 25, "--steps", "env,cuda_tests,suite", timeout=120)
    assert result.returncode == 0, result.stdout[-3000:]
    steps = json.loads((tmp_path / "gpu_check.json").read_text())["steps"]
    assert list(steps) == ["env", "cuda_tests", "suite"]
    assert steps["env"]["status"] == "ok" and steps["env"]["share_s"] == 20
    for name in ("cuda_tests", "suite"):
        assert steps[name]["status"] == "not run" and "beyond the budget of 25 s" in steps[name]["reason"]
    env = json.loads((tmp_path / "gpu_check.json").read_text())["env"]
    assert env["requirements_unsatisfied"] == [] and env["packages"]["datasets"] == importlib.metadata.version(
        "datasets")


def test_the_shares_fit_nine_minutes_and_a_larger_budget_goes_to_the_last_step(capsys):
    assert list(gpu_check.STEPS) == STEPS and gpu_check.BUDGET_S <= 9 * 60 < gpu_check.DEVICE_TIMEOUT_S
    steps = gpu_check.plan(type("Args", (), {"steps": ["syncs", "suite"], "budget": 500, "no_wheels": True}))
    assert {name: step["deadline_s"] for name, step in steps.items()} == {"syncs": 40, "suite": 500}
    assert capsys.readouterr().out.splitlines() == ["syncs 40 40", "suite 90 500"]


@pytest.mark.slow
def test_gpu_check_dry_run_runs_every_step_and_records_it(tmp_path):
    """Every step at --smoke size (two experiments keep it short: each step's plumbing is the same for all), with
    a wheel folder holding one distribution this machine lacks."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    make_wheel(wheels, "gpu-check-probe", "1.0", {"gpu_check_probe/__init__.py": ""})
    out = tmp_path / "out"
    result = check(out, "--dry-run", "--wheels", wheels, "--experiments", "E2_linear_probe", "E4_deep_vpt")
    assert result.returncode == 0, result.stdout[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "gpu_check.log"]
    results = json.loads((out / "gpu_check.json").read_text())
    assert list(results["steps"]) == STEPS
    assert all(step["status"] == "ok" for step in results["steps"].values()), results["steps"]
    assert list(results["wheels"]["installed"]) == ["gpu-check-probe"]
    assert results["env"]["packages"]["torch"] and results["env"]["cuda_available"] is False
    assert results["env"]["requirements_unsatisfied"] == []
    assert [r["experiment"] for r in results["bench"]["experiments"]] == ["E2_linear_probe", "E4_deep_vpt"]
    compiled = results["bench_compile"]
    assert compiled["compile"] is True and [r["experiment"] for r in compiled["experiments"]] == ["E4_deep_vpt"]
    assert all(r["train_step_s"] > 0 and r["train_warmup_s"] > 0 for r in compiled["experiments"])
    [e8] = results["e8_step"]["experiments"]
    assert e8["experiment"] == "E8_caption_peft" and e8["train_images_per_s"] > 0 and e8["trainable_params"] > 0
    assert results["syncs"]["exit_code"] == 0 and results["syncs"]["syncs"] is None   # counted on CUDA only
    suite = results["suite"]
    assert suite["exit_code"] == 0 and list(suite["experiments"]) == ["E2_linear_probe", "E4_deep_vpt"]
    assert suite["phases_s"]["training"] > 0 and suite["phases_s"]["reports"] > 0
    assert suite["phases_s"]["outside_experiments"] > 0
    assert "gpu_check summary" in (out / "gpu_check.log").read_text()

