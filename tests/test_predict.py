"""python -m clip_adapt.predict: a finished run applied to new images gives what the run itself gave."""

import contextlib
import csv
import io
import json
import os

import pytest
from conftest import REPO, run_script

from clip_adapt import predict
from clip_adapt.runner import classification_scripts

SCRIPTS = [script.path.name for script in classification_scripts()]
SAMPLE_TEST = REPO / "sample_data" / "brain_mri" / "test"


def rows_by_image(path) -> dict[str, dict]:
    return {os.path.basename(row["file"]): row for row in csv.DictReader(path.read_text().splitlines())}


@pytest.mark.parametrize("script", SCRIPTS)
def test_predict_reproduces_the_runs_own_test_predictions(script, tmp_path):
    """Every method: the model rebuilt from metrics.json's settings with the best checkpoint loaded, on the test
    images as a plain folder, gives the run's predictions.csv (class and every probability)."""
    with contextlib.redirect_stdout(io.StringIO()):
        run_script(script, "--smoke", "--output-dir", tmp_path, "--noise-levels", 0, "--quiet", expect_exit=0)
        run = tmp_path / script.removesuffix(".py")
        predict.main([str(run), str(SAMPLE_TEST), "--output", str(tmp_path / "new.csv")])
    own, new = rows_by_image(run / "predictions.csv"), rows_by_image(tmp_path / "new.csv")
    assert set(new) == set(own) and len(own) == 20
    probabilities = [key for key in next(iter(own.values())) if key.startswith("p_")]
    assert probabilities and set(next(iter(new.values()))) == {"file", "prediction", *probabilities}
    for image, row in own.items():
        assert new[image]["prediction"] == row["prediction"], image
        assert [float(new[image][p]) for p in probabilities] == pytest.approx(
            [float(row[p]) for p in probabilities], abs=1e-5), image


def test_predict_refuses_what_it_cannot_apply_in_one_line(tmp_path, capsys):
    for argv in ([str(tmp_path), str(SAMPLE_TEST)], [str(tmp_path), str(tmp_path / "nowhere")]):
        with pytest.raises(SystemExit) as exit_:
            predict.main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
    assert "holds no metrics.json" in predict_error(tmp_path, SAMPLE_TEST, capsys)
    # A CLIP other than the run's (a hub model that moved on, another directory) is refused, not combined.
    with contextlib.redirect_stdout(io.StringIO()):
        run_script("E1_zero_shot_clip.py", "--smoke", "--output-dir", tmp_path, "--noise-levels", 0, expect_exit=0)
    run = tmp_path / "E1_zero_shot_clip"
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["model_weights"] = {"weights_fingerprint": "0" * 32}
    (run / "metrics.json").write_text(json.dumps(metrics))
    assert "is not the one the run used" in predict_error(run, SAMPLE_TEST, capsys)


def predict_error(run, images, capsys) -> str:
    with pytest.raises(SystemExit):
        predict.main([str(run), str(images)])
    return capsys.readouterr().err
