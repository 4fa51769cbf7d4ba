"""Experiments are found, not listed: a new E<number>_<name>.py is run, benchmarked and tested with no other edit."""

import shutil
import subprocess
import sys

from conftest import REPO

from clip_adapt.runner import experiment_scripts

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


def test_a_new_script_is_picked_up_by_run_all_and_by_the_tests(tmp_path):
    """E9_example.py, a copy of E2 under another name, in a copy of the repository."""
    copy = tmp_path / "repo"
    copy.mkdir()
    for name in COPIED:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, copy / name)
    for script in experiment_scripts():
        shutil.copy(script.path, copy / script.path.name)
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

    collected = subprocess.run([sys.executable, "-m", "pytest", "-n", "0", "--collect-only", "-q", "tests/test_scripts.py"],
                               cwd=copy, capture_output=True, text=True, timeout=300).stdout
    assert "E9_example.py" in collected



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
