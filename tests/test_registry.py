"""Experiments are found, not listed: a new E<number>_<name>.py is run, benchmarked and tested with no other edit."""

import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO

from clip_adapt.captioning import PEFT_METHODS
from clip_adapt.runner import classification_scripts, experiment_scripts

COPIED = ["common.py", "run_all_experiments.py", "pyproject.toml", "clip_adapt", "tools", "tests", "sample_data"]


def test_every_script_declares_what_the_tools_need():
    scripts = experiment_scripts()
    assert [s.short_name for s in scripts] == sorted((s.short_name for s in scripts), key=lambda n: int(n[1:]))
    for script in scripts:
        module = script.module
        assert callable(module.add_flags) and callable(module.build_model) and callable(module.main), script.name
        assert script.learning_rate is None or script.learning_rate > 0, script.name
        assert script.study_accuracy is None or 0 <= script.study_accuracy <= 1, script.name
        assert script.parser().parse_args([]).lr in (script.learning_rate, None), script.name


def repository_copy(tmp_path):
    """A copy of the repository's code, tests and sample data, with every experiment script; ../shared (the
    project data) linked beside it, as beside the repository."""
    copy = tmp_path / "repo"
    copy.mkdir()
    if (REPO.parent / "shared").exists():
        (tmp_path / "shared").symlink_to(REPO.parent / "shared", target_is_directory=True)
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy / name)
    for script in experiment_scripts():
        shutil.copy(script.path, copy / script.path.name)
    return copy


def test_a_new_script_is_picked_up_by_run_all_and_by_the_tests(tmp_path):
    """E9_example.py, a copy of E2 under another name, in a copy of the repository."""
    copy = repository_copy(tmp_path)
    shutil.copy(REPO / "E2_linear_probe.py", copy / "E9_example.py")

    help_text = subprocess.run([sys.executable, "run_all_experiments.py", "--help"], cwd=copy, capture_output=True,
                               text=True, timeout=120).stdout
    assert "E9_example" in help_text   # among the default experiments
    run = subprocess.run([sys.executable, "run_all_experiments.py", "--smoke", "--experiments", "E9_example",
                          "--epochs", "1", "--noise-levels", "0", "--output-dir", "out"], cwd=copy,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (copy / "out" / "E9_example" / "metrics.json").exists()
    assert "| E9_example |" in (copy / "out" / "summary.md").read_text()

    collected = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "--collect-only", "-q", "tests/test_any_data.py"],
                               cwd=copy, capture_output=True, text=True, timeout=300).stdout
    assert "test_saved_cifar100_layout_runs_through_every_script[E9_example.py]" in collected


@pytest.mark.slow   # the fast tier's smoke run of every script, in a copy: 195 s on a loaded 2-core Xeon
def test_breaking_any_script_fails_the_fast_tier(tmp_path):
    """A `raise` planted as the first line of every script's build_model, in a copy: the fast tier's runs of each
    script at smoke size (test_any_data.py's test_saved_cifar100_layout_runs_through_every_script, one case per
    discovered classification script; test_captioning.py's smoke run for captioning) fail for every one of them,
    each with the planted error."""
    copy = repository_copy(tmp_path)
    scripts = experiment_scripts()
    for script in scripts:
        path = copy / script.path.name
        source, planted = path.read_text(), 0
        def plant(match):
            nonlocal planted
            planted += 1
            return f"{match.group(0)}{match.group(1)}    raise RuntimeError('planted in {script.name}')\n"
        path.write_text(re.sub(r"^( *)def build_model\(.*\):\n", plant, source, count=1, flags=re.M))
        assert planted == 1, script.name
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-rf", "tests/test_any_data.py",
                          "tests/test_captioning.py", "-k", "test_saved_cifar100_layout_runs_through_every_script "
                          "or test_smoke_writes_every_output"], cwd=copy, capture_output=True, text=True, timeout=900)
    assert run.returncode == 1, run.stdout[-3000:]
    failed = set(re.findall(r"^FAILED (\S+)", run.stdout, flags=re.M))
    classification = {f"tests/test_any_data.py::test_saved_cifar100_layout_runs_through_every_script[{s.path.name}]"
                      for s in classification_scripts()}
    captioning = {test for test in failed if test.startswith("tests/test_captioning.py::test_smoke_writes_every_output")}
    assert classification <= failed and len(captioning) == len(PEFT_METHODS), failed
    assert all(f"planted in {script.name}" in run.stdout for script in scripts), run.stdout[-3000:]
    assert "passed" not in run.stdout.splitlines()[-1], run.stdout[-3000:]   # no case of any script passed



def test_no_file_in_the_repository_holds_an_unresolved_merge():
    """A conflict left in a page or a module once landed unnoticed (README.md): the markers never pass."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:   # not a git checkout (an exported copy): look at the text files on disk instead
        tracked = [str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.suffix in (".py", ".md", ".txt", ".toml")]
    conflicted = [name for name in tracked if (REPO / name).is_file() and (REPO / name).suffix in
                  (".py", ".md", ".txt", ".toml", ".sh", ".cfg", "") and any(
                      line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in
                      (REPO / name).read_text(errors="replace").splitlines())]
    assert not conflicted, conflicted
