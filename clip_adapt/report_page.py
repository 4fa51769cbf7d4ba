"""outputs/report.html: the whole run on one self-contained static page, to look at rather than read.

Figures are inlined as base64 data URIs and the style sheet sits in the page, so the file opens offline, can be
mailed or archived on its own, and needs no server and no JavaScript. It names the model and the data (with a
banner when the weights are random), holds the run's command, the data, its duplicate report and the contact
sheet of closest test-train pairs (once), the summary tables (those of summary.md), and per experiment its headline
metrics, curves (none for zero-shot, which trains nothing; E1's per-template table instead), confusion matrix,
reliability diagram, classification report and robustness. It fits a 1,280 px window without sideways scrolling.

run_all_experiments.py writes it at the end; `python -m clip_adapt.report_page [OUTPUT_DIR]` writes it again from the
files already there (after a rerun of one experiment, say): the experiments that run.json lists (those of the
folder's last run_all), or, without one, every finished experiment in the folder.
"""

import argparse
import base64
import csv
import html
import json
import re
import sys
from pathlib import Path

from clip_adapt.base import write_text
from clip_adapt.copies import describe_copies
from clip_adapt.reporting import FITTED_ONCE

SUMMARY_FIGURES = [("summary.png", "Test accuracy against trainable parameters"),
                   ("summary_robustness.png", "Test accuracy under pixel noise"),
                   ("summary_shots.png", "Test accuracy against labelled images per class (K shots)")]
RUN_FIGURES = [("loss_curves.png", "loss"), ("accuracy_curves.png", "accuracy"),
               ("c_sweep.png", "held-out accuracy and loss against C (L-BFGS: no epochs)"),
               ("confusion_matrix.png", "confusion matrix (test)"), ("reliability_diagram.png", "reliability (test)"),
               ("robustness.png", "accuracy under noise")]
CONTACT_SHEET = ("closest_pairs.png", "closest test–train pairs, by eye (near-copy check)")   # the data's: shown once
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1180px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
code, pre { background: #f4f4f4; } pre { padding: 0.6em; overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; white-space: nowrap; }
th { white-space: normal; }   /* long headers wrap, so that a wide table still fits the page */
.banner { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; font-weight: bold; }
th:first-child, td:first-child { text-align: left; }
table.facts td:last-child { white-space: normal; max-width: 44em; text-align: left; }   /* a long reason wraps */
ul { margin: 0.3em 0; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } figure img { max-width: 560px; width: 100%; height: auto; } figcaption { font-size: 0.85em; color: #555; }
.summary figure img { max-width: 100%; width: auto; }   /* the run's plots at their own size: one panel per method */
"""


def run_folders(out_dir: Path) -> list[Path]:
    """The experiments of out_dir's last run_all (run.json), or every finished one under out_dir (metrics.json is
    written last), single-seed or per seed."""
    out_dir = Path(out_dir)
    if (out_dir / "run.json").exists():
        return [out_dir / name for name in json.loads((out_dir / "run.json").read_text())["experiments"]]
    return sorted(p.parent for p in [*out_dir.glob("*/metrics.json"), *out_dir.glob("seed_*/*/metrics.json")])


def data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def figures(folder: Path, wanted: list[tuple[str, str]], kind: str = "") -> str:
    items = [f'<figure><img src="{data_uri(folder / name)}" alt="{html.escape(caption)}">'
             f"<figcaption>{html.escape(caption)}</figcaption></figure>"
             for name, caption in wanted if (folder / name).exists()]
    return f'<div class="figures {kind}">{"".join(items)}</div>' if items else ""


def inline_markdown(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_table(lines: list[str]) -> str:
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]
    head, body = cells[0], cells[2:]   # cells[1] is the |---| rule
    return ("<table><tr>" + "".join(f"<th>{inline_markdown(c)}</th>" for c in head) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{inline_markdown(c)}</td>" for c in row) + "</tr>" for row in body) +
            "</table>")


def summary_sections(summary_md: str) -> str:
    """The tables and notes of summary.md, without its title, banner, command line and figure links (shown apart).
    Only the few constructs run_all_experiments.markdown() writes are understood: headings, tables, paragraphs."""
    parts, table, items = [], [], []
    for line in summary_md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            parts.append(markdown_table(table))
            table = []
        if line.startswith("- "):
            items.append(f"<li>{inline_markdown(line[2:])}</li>")
            continue
        if items:
            parts.append(f"<ul>{''.join(items)}</ul>")
            items = []
        if line.startswith("## Figures"):
            break
        if line.startswith("## "):
            parts.append(f"<h3>{inline_markdown(line[3:])}</h3>")
        elif line.strip() and not line.startswith(("# ", "**Random weights**")) and \
                not re.fullmatch(r"`[^`]*`", line.strip()):   # title, banner and command: shown apart
            parts.append(f"<p>{inline_markdown(line)}</p>")
    return "\n".join(parts)


def command_of(summary_md: str) -> str | None:
    found = re.search(r"^`([^`]+)`$", summary_md, re.MULTILINE)
    return found.group(1) if found else None


def data_section(report: dict) -> str:
    sizes = ", ".join(f"{n} {split}" for split, n in report.get("num_images", {}).items())
    rows = [f"<p>Data: <code>{html.escape(str(report.get('source', '?')))}</code>; images: {sizes}.</p>",
            f"<p>{html.escape(describe_copies(report))}</p>"]
    for key, what in (("skipped_images", "Skipped unreadable images"),
                      ("dropped_train_duplicates", "Dropped train copies of test images")):
        if report.get(key):
            rows.append(f"<p>{what}: {html.escape(', '.join(report[key]))}</p>")
    rows.append("<details><summary>data_report.json</summary><pre>" +
                html.escape(json.dumps(report, indent=2)) + "</pre></details>")
    return "\n".join(rows)


def csv_table(path: Path) -> str:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return ""

    def cell(value: str) -> str:
        """Numbers as docs/reports.md promises: three decimals (whole numbers as they are)."""
        try:
            number = float(value)
        except ValueError:
            return html.escape(value)
        return value if re.fullmatch(r"-?\d+", value.strip()) else f"{number:.3f}"
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>" +
            "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in row) + "</tr>" for row in rows[1:]) +
            "</table>")


def convergence_text(metrics: dict) -> str:
    """'yes' or 'NOT CONVERGED', with the reason; runs from before the flag existed say 'not recorded'."""
    if "converged" not in metrics:
        return "not recorded"
    return f"{'yes' if metrics['converged'] else 'NOT CONVERGED'}: {metrics['convergence_reason']}"


def auroc_facts(metrics: dict) -> list[tuple[str, str]]:
    """The macro one-vs-rest AUROC with its interval, and each class's; none for a run from before it existed."""
    scores = metrics.get("auroc")
    if not scores or scores["macro"] is None:
        return []
    low, high = scores["macro_ci95"] or (float("nan"), float("nan"))
    return [("AUROC, macro one-vs-rest", f"{scores['macro']:.3f} (95% CI {low:.3f}–{high:.3f})"),
            ("AUROC per class", ", ".join(f"{name} {'–' if v is None else f'{v:.3f}'}"
                                          for name, v in scores["per_class"].items()))]


def run_section(folder: Path, title: str) -> str:
    m = json.loads((folder / "metrics.json").read_text())
    low, high = m["test_accuracy_ci95"]
    facts = [("test accuracy", f"{m['test_accuracy']:.3f} (95% CI {low:.3f}–{high:.3f})"),
             ("macro-F1", f"{m['test_macro_f1']:.3f}"), *auroc_facts(m), ("balanced accuracy", f"{m['test_balanced_accuracy']:.3f}"),
             ("ECE", f"{m['test_ece']:.3f}"),
             ("train / val accuracy", f"{m['train_accuracy']:.3f} / {m['val_accuracy']:.3f}"),
             ("best epoch", f"{m['best_epoch']} of {m['epochs_run']}" if m.get("solver") not in FITTED_ONCE else
              f"none: fitted once ({m['solver']}" + (f", C = {m['l2_c']:.3g} chosen by its sweep)" if "l2_c" in m
                                                      else ")")),
             ("converged", convergence_text(m)),
             ("trainable parameters", f"{m['trainable_params']:,} of {m['total_params']:,}"),
             ("wall time", f"{m['wall_time_s']:.1f} s on {m['device']}"), ("model", m["model"])]
    parts = [f'<h2 id="{html.escape(title)}">{html.escape(title)}</h2>',
             '<table class="facts">' + "".join(f"<tr><td>{k}</td><td>{html.escape(str(v))}</td></tr>"
                                               for k, v in facts) + "</table>",
             figures(folder, RUN_FIGURES)]
    if (folder / "templates.csv").exists():
        parts.append("<h3>Templates (accuracy of each, and of their ensemble)</h3>" + csv_table(folder / "templates.csv"))
    if (folder / "classification_report.txt").exists():
        parts.append("<h3>Classification report</h3><pre>" +
                     html.escape((folder / "classification_report.txt").read_text()) + "</pre>")
    if (folder / "robustness.csv").exists():
        parts.append("<h3>Robustness (Gaussian pixel noise)</h3>" + csv_table(folder / "robustness.csv"))
    return "\n".join(parts)


def random_weights(metrics: list[dict]) -> bool:
    return any(m.get("weights") == "random" for m in metrics)


def render(out_dir: Path, runs: list[Path], command: str | None = None) -> str:
    out_dir = Path(out_dir)
    summary_md = (out_dir / "summary.md").read_text() if (out_dir / "summary.md").exists() else ""
    command = command or command_of(summary_md)
    titles = [str(run.relative_to(out_dir)) if run.is_relative_to(out_dir) else run.name for run in runs]
    metrics = [json.loads((run / "metrics.json").read_text()) for run in runs]
    models = ", ".join(dict.fromkeys(m["model"] for m in metrics))
    data = ", ".join(dict.fromkeys(m["data"] for m in metrics))
    title = f"{models} on {data}: results" if metrics else "Results"
    body = [f"<h1>{html.escape(title)}</h1>"]
    if random_weights(metrics):
        body.append('<p class="banner">Random weights: these accuracies test the pipeline, not the methods; they '
                    'say nothing about CLIP.</p>')
    if command:
        body.append(f"<p>Command: <code>{html.escape(command)}</code></p>")
    if runs:
        body.append("<p>Experiments: " + ", ".join(f'<a href="#{html.escape(t)}">{html.escape(t)}</a>'
                                                     for t in titles) + "</p>")
    # No finished run: any summary plot in the folder is an earlier run's.
    body.append("<h2>Summary</h2>" + summary_sections(summary_md) + (figures(out_dir, SUMMARY_FIGURES, "summary") if runs else ""))
    data_reports = [run for run in runs if (run / "data_report.json").exists()]
    if data_reports:
        body.append("<h2>Data</h2>" + data_section(json.loads((data_reports[0] / "data_report.json").read_text())))
    body += [run_section(run, title) for run, title in zip(runs, titles)]
    # Every experiment of a run saw the same data: one sheet, in the run's output folder, shown last as it is long.
    sheets = [folder for folder in dict.fromkeys(run.parent for run in runs) if (folder / CONTACT_SHEET[0]).exists()]
    if sheets:
        body.append('<h2 id="near-copies">Near-copy check, by eye</h2>' + figures(sheets[0], [CONTACT_SHEET]))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) +
            "\n</body></html>\n")


def write_html_report(out_dir: Path, runs: list[Path] | None = None, command: str | None = None) -> Path:
    """Writes <out_dir>/report.html for `runs` (experiment output folders; default: every finished one)."""
    out_dir = Path(out_dir)
    path = out_dir / "report.html"
    write_text(path, render(out_dir, run_folders(out_dir) if runs is None else runs, command))
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", nargs="?", default="outputs", help="the --output-dir of a run")
    folder = Path(p.parse_args().output_dir)
    if not folder.is_dir():
        print(f"error: no output folder {folder}; pass the --output-dir of a run", file=sys.stderr)
        sys.exit(2)
    print(f"report written to {write_html_report(folder)}")


if __name__ == "__main__":
    main()
