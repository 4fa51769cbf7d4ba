"""Paired comparisons of methods on the same test images: is a difference in accuracy real?

For two methods A and B, each image either is right or wrong under each, seed by seed. The difference in accuracy
gets a paired bootstrap 95% interval (the test images resampled, and the seeds too where there are several, the
same draw for both methods), the discordant images McNemar's exact test (statsmodels; pooled over seeds where
there are several, which treats the seeds' runs as further images and so leans optimistic), and the p-values of
one table Holm's correction (statsmodels' multipletests) across its pairs.
"""

import itertools

import numpy as np

ALPHA = 0.05
RESAMPLES = 2000


def paired_difference(correct_a: np.ndarray, correct_b: np.ndarray, seed: int = 0,
                      resamples: int = RESAMPLES) -> dict:
    """correct_a, correct_b: (seeds, images) booleans, row s of both from seed s. The accuracy difference A - B,
    its paired bootstrap interval and McNemar's exact p-value on the discordant images."""
    from statsmodels.stats.contingency_tables import mcnemar
    a, b = np.atleast_2d(correct_a).astype(bool), np.atleast_2d(correct_b).astype(bool)
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs the same seeds and test images, got {a.shape} and {b.shape}")
    seeds, images = a.shape
    differences = (a.astype(float) - b.astype(float))
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, seeds, (resamples, seeds)) if seeds > 1 else np.zeros((resamples, 1), dtype=int)
    columns = rng.integers(0, images, (resamples, images))
    # Resample s: the mean over the drawn seeds of the difference over the drawn images.
    draws = np.stack([differences[rows[:, s]][np.arange(resamples)[:, None], columns].mean(1)
                      for s in range(rows.shape[1])], axis=1).mean(1)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    table = [[int((a & b).sum()), only_a], [only_b, int((~a & ~b).sum())]]
    p = float(mcnemar(table, exact=True).pvalue)
    return {"difference": float(differences.mean()), "ci95": [float(np.percentile(draws, 2.5)),
                                                              float(np.percentile(draws, 97.5))],
            "only_a": only_a, "only_b": only_b, "p": p, "seeds": seeds, "images": images}


def compare_all(correct: dict[str, np.ndarray], seed: int = 0) -> list[dict]:
    """Every pair of the methods as (A, B), A the later in the order given (E4 − E2), each compared as
    paired_difference, with Holm's adjusted p-value across these pairs and whether it is below ALPHA."""
    from statsmodels.stats.multitest import multipletests
    pairs = [{"a": a, "b": b, **paired_difference(correct[a], correct[b], seed)}
             for b, a in itertools.combinations(correct, 2)]
    if pairs:
        reject, adjusted, _, _ = multipletests([pair["p"] for pair in pairs], alpha=ALPHA, method="holm")
        for pair, significant, p in zip(pairs, reject, adjusted):
            pair["p_holm"], pair["significant"] = float(p), bool(significant)
    return pairs


def short(name: str) -> str:
    return name.split("_")[0]


def pair_line(pair: dict) -> str:
    """'E4 − E2: +0.9 points [−1.3, 3.1], p = 0.45 (Holm 0.90), not significant'."""
    low, high = (100 * x + 0.0 for x in pair["ci95"])
    verdict = "**significant**" if pair["significant"] else "not significant"
    return (f"{short(pair['a'])} − {short(pair['b'])}: {100 * pair['difference'] + 0.0:+.1f} points "
            f"[{low:.1f}, {high:.1f}], p = {pair['p']:.3g} (Holm {pair['p_holm']:.3g}), {verdict}")


def pair_matrix(pairs: list[dict], names: list[str]) -> list[str]:
    """A Markdown table: row B, column A holds B − A in points and Holm's p."""
    cell = {}
    for pair in pairs:
        d = 100 * pair["difference"] + 0.0   # no "-0.0"
        mark = " *" if pair["significant"] else ""
        cell[(pair["a"], pair["b"])] = f"{d:+.1f} (p {pair['p_holm']:.2g}){mark}"
        cell[(pair["b"], pair["a"])] = f"{-d:+.1f} (p {pair['p_holm']:.2g}){mark}"
    lines = ["| row − column | " + " | ".join(short(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {short(row)} | " + " | ".join("–" if row == column else cell.get((row, column), "")
                                                for column in names) + " |" for row in names]
    return lines
