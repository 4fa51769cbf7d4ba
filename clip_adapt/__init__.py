"""The library behind the experiment scripts: adapting CLIP to an image-classification task, one module per subject.

base (the ground floor: one-line errors, atomic writes, the main process), data (images in), copies (exact and
near copies), models (CLIP and the classifiers), prompts (VPT tokens, pixel prompts, text context), adapters
(E7's peft adapters), training (the loop and its resume state), reporting (metrics, plots, files out),
report_page (report.html), progress (bars and lines), runner (finding and running the experiment scripts).
"""
