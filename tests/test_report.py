"""What a user looks at: summary.md's figures, report.html (in a real browser where one is installed),
progress on long steps, and --report-to tensorboard."""

import base64
import contextlib
import csv
import io
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from conftest import run_script

from clip_adapt import progress

RUN = ["E1_zero_shot_clip", "E2_linear_probe", "E3_shallow_vpt"]
# Two summary plots and the contact sheet (once); per experiment: confusion, reliability, robustness; loss and
# accuracy curves for E3, which trains by epochs; E2's C sweep (its L-BFGS probe has no epochs).
FIGURES_PER_PAGE = 3 + 3 * len(RUN) + 2 + 1
BROWSER = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """run_all --smoke on three experiments (zero-shot, cached embeddings, prompts); its stdout, which is not a
    terminal here, is kept. No optional extra is needed: the tests of one (tensorboard, Chromium) skip alone."""
    out_dir = tmp_path_factory.mktemp("report_run")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_script("run_all_experiments.py", "--smoke", "--output-dir", out_dir, "--experiments", *RUN,
                   expect_exit=0)
    return out_dir, stdout.getvalue()


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if tag != "img" and attrs.get(key):
                self.links.append(attrs[key])


def parse(html_text: str) -> Page:
    page = Page()
    page.feed(html_text)
    page.close()
    return page


# --------------------------------------------------------------------------- summary.md

def test_summary_md_links_every_figure_that_exists(smoke_run):
    out_dir, _ = smoke_run
    summary = (out_dir / "summary.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", summary)
    assert all((out_dir / link).is_file() for link in linked), linked
    expected = {"summary.png", "summary_robustness.png", "closest_pairs.png"} | {
        f"{name}/{figure}" for name in RUN for figure in ("loss_curves.png", "accuracy_curves.png",
                                                           "confusion_matrix.png") if "curves" not in figure or name == RUN[2]}
    assert set(linked) == expected   # zero-shot trains nothing and the probe is fitted once: no curves
    assert summary.index("| experiment |") < summary.index("## Figures")   # the tables stay on top


def test_summary_md_says_why_a_run_failed_and_keeps_nothing_of_an_earlier_run(tmp_path):
    (tmp_path / "summary.png").write_bytes(b"an earlier run's plot")
    (tmp_path / "E1_zero_shot_clip").mkdir()
    (tmp_path / "E1_zero_shot_clip" / "metrics.json").write_text("{}")   # an earlier run's
    # A setting that only the experiment's own data split can refuse: it fails inside the run.
    run_script("run_all_experiments.py", "--smoke", "--output-dir", tmp_path, "--val-fraction", 0.9,
               "--experiments", "E1", expect_exit=1)
    summary = (tmp_path / "summary.md").read_text()
    assert "**Failed:** E1_zero_shot_clip" in summary and "![" not in summary and "## Figures" not in summary
    assert "- E1_zero_shot_clip: `error: train has too few images" in summary   # the reason, captured
    assert not (tmp_path / "summary.png").exists() and not (tmp_path / "E1_zero_shot_clip" / "metrics.json").exists()
    page = (tmp_path / "report.html").read_text()
    assert "<img" not in page and "train has too few images" in page


# --------------------------------------------------------------------------- report.html

def test_report_html_is_one_self_contained_page(smoke_run):
    out_dir, _ = smoke_run
    text = (out_dir / "report.html").read_text()
    page = parse(text)
    # Two summary plots, and per experiment: loss, accuracy, confusion, reliability, robustness, closest pairs.
    assert len(page.images) == FIGURES_PER_PAGE
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "script" not in page.tags and "link" not in page.tags   # no JavaScript, no external style sheet
    assert all(link.startswith("#") for link in page.links), page.links   # nothing to fetch, nothing served
    assert "run_all_experiments.py --smoke --output-dir" in text   # the command
    assert "0 test images have a copy in train" in text and "data_report.json" in text   # the near-copy check
    for name in RUN:
        assert f'id="{name}"' in text
        report = (out_dir / name / "classification_report.txt").read_text().splitlines()[2]
        assert report.split()[0] in text   # a class row of each classification report
    assert text.count("<table") >= 2 + 2 * len(RUN)   # summary + noise, and per run: facts + robustness
    assert "E3_shallow_vpt</td>" in text   # the summary table rows
    # Named for its model and data, flagged as random weights, and without the study's numbers beside them.
    assert "<h1>tiny-random-clip on " in text and "sample_data/brain_mri: results</h1>" in text
    assert text.count('class="banner">Random weights') == 1 and "<th>study</th>" not in text
    assert text.count("<figcaption>closest test–train pairs") == 1   # the data's contact sheet, once
    e1 = text[text.index('id="E1_zero_shot_clip"'):text.index('id="E2_linear_probe"')]
    assert "<h3>Templates" in e1 and "ensemble of 4" in e1 and 'alt="loss"' not in e1


def table_cells(text: str) -> list[str]:
    return re.findall(r"<td>([^<]*)</td>", text)


def test_report_html_reads_cleanly(smoke_run):
    """What a reader of the page meets: lists as lists, numbers to three decimals (docs/reports.md), E2's C sweep
    in place of curves and epochs, a long convergence reason wrapped inside its table, one contact sheet."""
    out_dir, _ = smoke_run
    text = (out_dir / "report.html").read_text()
    assert "<p>- " not in text and "<ul><li>E3_shallow_vpt: reached the epoch cap" in text   # not-converged list
    numbers = re.findall(r"\d+\.\d+", " ".join(table_cells(text)))   # in the summary's, the facts', every table
    # None unrounded: three decimals, or three significant digits (a share, E2's C); wall times to a tenth.
    assert numbers and not [n for n in numbers if len(n.split(".")[1]) > 3 and len(n.replace(".", "").lstrip("0")) > 3]
    e2 = text[text.index('id="E2_linear_probe"'):text.index('id="E3_shallow_vpt"')]
    assert 'alt="held-out accuracy and loss against C' in e2 and 'alt="loss"' not in e2
    assert "none: fitted once (lbfgs, C = " in e2 and " of 1</td>" not in e2
    e2_row = next(line for line in (out_dir / "summary.md").read_text().splitlines()
                  if line.startswith("| E2_linear_probe |"))
    assert "| – | – |" in e2_row   # no best epoch, no epochs run for a solver
    assert "table.facts td:last-child { white-space: normal" in text   # NOT CONVERGED's reason wraps
    assert text.count('class="facts"') == len(RUN)
    assert len(list(out_dir.rglob("closest_pairs.png"))) == 1 and text.count("<figcaption>closest test–train") == 1


def png_text(path) -> dict:
    from PIL import Image
    with Image.open(path) as image:
        return dict(image.text)


def test_every_figure_of_a_random_weights_run_says_so(smoke_run, tmp_path):
    """Each PNG of a run on random weights carries the mark, drawn and in its metadata; a figure of a pretrained
    model carries neither."""
    import numpy as np
    from PIL import Image

    from clip_adapt import reporting
    out_dir, _ = smoke_run
    pngs = sorted(out_dir.rglob("*.png"))
    assert len(pngs) >= FIGURES_PER_PAGE
    assert [p for p in pngs if png_text(p).get("Weights") != "random"] == []
    curves = {"E1": [(0.0, 0.5), (0.1, 0.4)]}
    try:
        for random in (True, False):
            reporting.mark_random_weights(random)
            reporting.plot_robustness(curves, "noise", tmp_path / f"{random}.png", 0.25)
    finally:
        reporting.mark_random_weights(False)
    assert png_text(tmp_path / "True.png")["Weights"] == "random" and "Weights" not in png_text(tmp_path / "False.png")
    def red_at_the_foot(png) -> int:   # the mark's line: dark red text along the figure's bottom edge
        rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
        foot = rgb[-rgb.shape[0] // 20:]
        return int(((foot[..., 0] > 150) & (foot[..., 1] < 90) & (foot[..., 2] < 90)).sum())
    assert red_at_the_foot(tmp_path / "True.png") > 100 and red_at_the_foot(tmp_path / "False.png") == 0


def test_the_robustness_plot_keeps_every_line_visible(monkeypatch, tmp_path):
    """Methods of equal accuracy (and the chance line) would lie on one another in one panel: one panel each,
    its own line on top, the others faint behind."""
    from clip_adapt import reporting
    figures = []
    monkeypatch.setattr(reporting, "save_figure", lambda fig, path: figures.append(fig))
    flat = [(0.0, 0.25), (0.1, 0.25), (0.2, 0.25)]
    curves = {"E1": flat, "E5": flat, "E10": flat, "E2": [(0.0, 0.45), (0.1, 0.4), (0.2, 0.2)]}
    reporting.plot_robustness(curves, "Robustness", tmp_path / "r.png", chance=0.25)
    panels = [ax for ax in figures[0].axes if ax.get_visible() and ax.axison]
    assert [ax.get_title() for ax in panels] == list(curves)
    for ax, (name, points) in zip(panels, curves.items()):
        top = max(ax.get_lines(), key=lambda line: line.get_zorder())   # drawn last: over the others and chance
        assert list(zip(top.get_xdata(), top.get_ydata())) == points and top.get_marker() == "o"


def test_report_html_can_be_written_again_from_the_files(smoke_run, tmp_path):
    out_dir, _ = smoke_run
    copy = shutil.copytree(out_dir, tmp_path / "copy")
    (copy / "report.html").unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        run_script("clip_adapt/report_page.py", copy, expect_exit=0)
    again = (copy / "report.html").read_text()
    assert len(parse(again).images) == FIGURES_PER_PAGE
    assert "run_all_experiments.py --smoke --output-dir" in again   # the command, read back from summary.md


def test_a_second_run_into_the_same_folder_replaces_the_first_in_summary_and_report(smoke_run, tmp_path):
    out_dir, _ = smoke_run
    again = shutil.copytree(out_dir, tmp_path / "again")
    with contextlib.redirect_stdout(io.StringIO()):
        run_script("run_all_experiments.py", "--smoke", "--output-dir", again, "--experiments", "E1",
                   "--noise-levels", 0.1, expect_exit=0)
        run_script("clip_adapt/report_page.py", again, expect_exit=0)
    page, summary = (again / "report.html").read_text(), (again / "summary.md").read_text()
    assert 'id="E1_zero_shot_clip"' in page and "| E1_zero_shot_clip |" in summary
    for earlier in ("E2_linear_probe", "E3_shallow_vpt"):   # their folders stay, outside this run
        assert earlier not in page and earlier not in summary and (again / earlier / "metrics.json").exists()
    assert len(parse(page).images) == 3 + 3


def test_report_html_on_a_missing_folder_is_a_one_line_error(tmp_path, capsys):
    run_script("clip_adapt/report_page.py", tmp_path / "nowhere", expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no output folder")


def chromium(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=timeout)


def colourful_pixels(png) -> int:
    """Pixels far from grey: the plots' lines, bars and heat maps (the page's text is black on white)."""
    import numpy as np
    from PIL import Image
    rgb = np.asarray(Image.open(png).convert("RGB")).astype(int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_html_renders_with_every_figure_in_a_headless_browser(smoke_run, tmp_path):
    out_dir, _ = smoke_run
    text = (out_dir / "report.html").read_text()
    # Each figure decodes in the browser: a copy of the page with a check appended (the report itself has no
    # script) writes how many images loaded into the DOM, which the browser dumps.
    # And the page is no wider than a 1,280 px window: no sideways scrolling.
    check = ("<script>window.addEventListener('load', () => { const images = [...document.images];"
             "document.body.setAttribute('data-loaded', images.filter(i => i.complete && i.naturalWidth > 0).length"
             " + '/' + images.length); const page = document.documentElement;"
             "document.body.setAttribute('data-width', page.scrollWidth + '/' + page.clientWidth); });</script>")
    (tmp_path / "checked.html").write_text(text.replace("</body>", check + "</body>"))
    dom = chromium("--window-size=1280,1000", "--virtual-time-budget=10000", "--dump-dom",
                   (tmp_path / "checked.html").as_uri()).stdout
    count = FIGURES_PER_PAGE
    assert f'data-loaded="{count}/{count}"' in dom
    scroll_width, window_width = map(int, re.search(r'data-width="(\d+)/(\d+)"', dom).groups())
    assert window_width == 1280 and scroll_width <= window_width, (scroll_width, window_width)

    # And they show: a screenshot of the page holds far more colour than one of the same page with its images
    # broken (the links are the only other colour).
    broken = re.sub(r'src="data:image/png;base64,[^"]+"', 'src="data:image/png;base64,"', text)
    (tmp_path / "broken.html").write_text(broken)
    shots = {}
    for name in ("report", "broken"):
        page = out_dir / "report.html" if name == "report" else tmp_path / "broken.html"
        shots[name] = tmp_path / f"{name}.png"
        chromium("--window-size=1280,4000", f"--screenshot={shots[name]}", page.as_uri())
    shown, without = colourful_pixels(shots["report"]), colourful_pixels(shots["broken"])
    assert shown > 4 * max(without, 1000), (shown, without)


# --------------------------------------------------------------------------- progress

def test_every_long_step_shows_one_line_when_output_is_not_a_terminal(smoke_run):
    out_dir, stdout = smoke_run
    assert "\r" not in stdout   # no bar redrawn per batch
    lines = stdout.splitlines()
    # Reading, decoding and preprocessing are one stream (clip_adapt.data.load_data): one line for all of it.
    for step in ("reading images: ",
                 "image embeddings (train): ", "image embeddings (test): ",   # E2's embedding pass
                 "epoch 1/3: ", "epoch 3: loss ", "final evaluation (test): ", "robustness, noise sigma 0.2: "):
        assert any(line.startswith(step) for line in lines), step
    # Once per experiment trained by gradient steps: E3 (E2's default L-BFGS probe has no epochs).
    assert sum(line.startswith("epoch 1/3: ") for line in lines) == 1
    assert sum(line.startswith("reading images") for line in lines) == len(RUN)


def test_quiet_silences_progress_but_not_the_result(tmp_path):
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        run_script("E3_shallow_vpt.py", "--smoke", "--quiet", "--output-dir", tmp_path, expect_exit=0)
    text = stdout.getvalue()
    assert "E3_shallow_vpt: test accuracy" in text
    assert not re.search(r"^(reading|preprocessing|epoch|final evaluation|robustness)", text, re.MULTILINE), text


def test_on_a_terminal_a_step_is_a_bar_on_stderr(monkeypatch, capsys):
    monkeypatch.setattr(progress, "on_terminal", lambda: True)
    monkeypatch.setattr(progress, "_quiet", False)   # an earlier --quiet run in this process may have set it
    assert list(progress.progress_bar(range(5), "some step")) == list(range(5))
    assert list(progress.progress_bar(range(2), "a pass", transient=True)) == [0, 1]
    out, err = capsys.readouterr()
    assert out == "" and "some step" in err and "5/5" in err


# --------------------------------------------------------------------------- TensorBoard

def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_report_to_tensorboard_logs_every_epoch(tmp_path):
    pytest.importorskip("tensorboard")
    run_script("E3_shallow_vpt.py", "--smoke", "--output-dir", tmp_path, "--report-to", "tensorboard", "--quiet",
               "--noise-levels", 0, expect_exit=0)
    logged = scalars(tmp_path / "E3_shallow_vpt" / "tensorboard")
    history = list(csv.DictReader((tmp_path / "E3_shallow_vpt" / "history.csv").read_text().splitlines()))
    assert set(logged) == {f"{m}/{s}" for m in ("loss", "accuracy") for s in ("train", "val", "test")} | {
        "learning_rate"}
    for tag, values in logged.items():
        column = "lr" if tag == "learning_rate" else "{1}_{0}".format(*tag.split("/"))
        assert [step for step, _ in values] == [int(row["epoch"]) for row in history]
        assert [v for _, v in values] == pytest.approx([float(row[column]) for row in history], rel=1e-5)


def test_quiet_and_report_to_may_change_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    flags = ["--smoke", "--output-dir", tmp_path]
    with contextlib.redirect_stdout(io.StringIO()):
        run_script("E3_shallow_vpt.py", *flags, "--stop-after-epochs", 1, expect_exit=0)
        run_script("E3_shallow_vpt.py", *flags, "--resume", "--quiet", "--report-to", "tensorboard", expect_exit=0)
    logged = scalars(tmp_path / "E3_shallow_vpt" / "tensorboard")
    assert [step for step, _ in logged["loss/val"]] == [2, 3]   # the epochs this invocation trained


def test_report_to_tensorboard_without_tensorboard_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails as if not installed
    run_script("E3_shallow_vpt.py", "--smoke", "--report-to", "tensorboard", "--output-dir", tmp_path, expect_exit=2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0], err
    assert not (tmp_path / "E3_shallow_vpt" / "metrics.json").exists()


def test_pixel_noise_is_added_batch_by_batch_and_follows_the_image():
    """The robustness passes add noise to each batch as it is used (no noisy copy of the test split): without
    noise the model sees its pixels unchanged; with noise, each image's noise is seeded by its index in the
    test set, so any batching or sharing of the set among processes gives each image the same noise."""
    from clip_adapt.reporting import WithPixelNoise
    from clip_adapt.training import predict
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 3))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = (torch.rand(10, 3, 4, 4) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    cpu, everything = torch.device("cpu"), torch.arange(10)

    def noisy(sigma, seed=0, rows=everything, batch_size=4):
        return predict(WithPixelNoise(model, sigma, mean, std, seed), pixels[rows], batch_size, cpu, indices=rows)

    assert torch.allclose(noisy(0.0), predict(model, pixels, 4, cpu), atol=1e-6)
    assert torch.equal(noisy(0.1), noisy(0.1)) and not torch.equal(noisy(0.1), noisy(0.1, seed=1))
    assert not torch.allclose(noisy(0.1), noisy(0.0))
    # Two processes' shares (3 and 7 images), other batch sizes: the same noise on each image.
    shared = torch.cat([noisy(0.1, rows=everything[:3], batch_size=2), noisy(0.1, rows=everything[3:], batch_size=5)])
    torch.testing.assert_close(shared, noisy(0.1), rtol=0, atol=1e-6)
    shifted = predict(WithPixelNoise(model, 0.1, mean, std, 0), pixels, 4, cpu, indices=everything + 1)
    assert not torch.allclose(shifted, noisy(0.1), atol=1e-3)   # the index, not the batch position, picks it



def test_summary_and_report_flag_every_run_that_did_not_converge(smoke_run):
    """A smoke run's 3 epochs are too few to tell that the training loss stopped falling: E3 is flagged."""
    import json
    out_dir, _ = smoke_run
    metrics = {name: json.loads((out_dir / name / "metrics.json").read_text()) for name in RUN}
    assert metrics["E3_shallow_vpt"]["converged"] is False and metrics["E1_zero_shot_clip"]["converged"] is True
    summary, page = (out_dir / "summary.md").read_text(), (out_dir / "report.html").read_text()
    rows = {r["experiment"]: r for r in csv.DictReader((out_dir / "summary.csv").read_text().splitlines())}
    for name, m in metrics.items():
        row = next(line for line in summary.splitlines() if line.startswith(f"| {name} |"))
        assert ("| **no** |" in row) == (not m["converged"]) and int(rows[name]["not_converged"]) == (not m["converged"])
        if not m["converged"]:
            assert f"- {name}: {m['convergence_reason']}" in summary
    assert page.count("NOT CONVERGED") == sum(not m["converged"] for m in metrics.values())
