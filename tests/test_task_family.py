"""Defaults proven on tasks they were not tuned on: the known-answer CLIP's task family (tools/known_answer.py
TASK_FAMILY: the class signal a weak direction of a tight cluster of embeddings; class imbalance; 16 images per
class; validation splits of 10 to 24 images, as small as the study's or smaller).

On every member, with default flags, over three seeds (each seed drawing its own validation split and training
seed): E2's L-BFGS probe is within E2_WITHIN of E2's recipe as scikit-learn does it end to end (a Pipeline of
StandardScaler and LogisticRegression, C by GridSearchCV's 5-fold cross-validated log-loss on train + validation);
E2 trained by AdamW, E3, E4 and E7 with their linear heads are within GRADIENT_WITHIN of a plain
LogisticRegressionCV (raw features, C by cross-validated accuracy, scikit-learn's long-standing default) or above;
no seed is more than SEED_BELOW below its method's mean; and every run's verdict is "converged". Two references
because the choice of recipe alone moves test accuracy by up to 0.1 on 160 test images (imbalanced: 0.675 raw by
accuracy, 0.744 standardised by log-loss, 0.781 raw by log-loss): E2 must equal the recipe it claims; the others
must reach what a plain logistic regression reaches. Measured figures: docs/known-answer.md ("The task family").
"""

import numpy as np
import pytest

from tools import known_answer

pytestmark = pytest.mark.slow

SEEDS = (0, 1, 2)
E2_WITHIN = 0.03          # measured: see docs/known-answer.md
GRADIENT_WITHIN = 0.05    # measured: the lowest mean -0.042 (E3, imbalanced)
SEED_BELOW = 0.05
GRADIENT = known_answer.FAMILY_GRADIENT


@pytest.fixture(scope="session")
def family(known_answer_dir, tmp_path_factory):
    """{task: folder with clip/ and shapes/} for every TASK_FAMILY member."""
    return known_answer.write_family(tmp_path_factory.mktemp("family"), known_answer_dir[0] / "clip")


@pytest.fixture(scope="session")
def references(family):
    """{task: {"e2_recipe": test accuracy, "plain": test accuracy}} (known_answer.family_references: transformers
    and scikit-learn alone, none of the project's training code)."""
    return {task: known_answer.family_references(folder) for task, folder in family.items()}


@pytest.mark.parametrize("task", list(known_answer.TASK_FAMILY))
def test_e2_lbfgs_equals_its_recipe_done_by_scikit_learn(task, family, references, tmp_path):
    accuracies = []
    for seed in SEEDS:
        metrics = known_answer.e2_lbfgs_run(family[task], seed, tmp_path / str(seed))
        assert metrics["converged"] and not metrics["c_at_grid_edge"], metrics["convergence_reason"]
        accuracies.append(metrics["test_accuracy"])
    mean = float(np.mean(accuracies))
    assert abs(mean - references[task]["e2_recipe"]) <= E2_WITHIN, (task, accuracies, references[task])
    assert min(accuracies) >= mean - SEED_BELOW, (task, accuracies)


@pytest.mark.parametrize("method", list(GRADIENT))
@pytest.mark.parametrize("task", list(known_answer.TASK_FAMILY))
def test_gradient_trained_linear_heads_reach_the_reference_and_converge(task, method, family, references):
    name, *flags = GRADIENT[method]
    accuracies = []
    for seed in SEEDS:
        data = known_answer.load_task(family[task], split_seed=seed)
        model, result = known_answer.train_method(family[task], data, name, *flags, "--split-seed", str(seed),
                                                  "--quiet", seed=seed)
        assert result.converged, (task, method, seed, result.convergence_reason)
        accuracies.append(known_answer.accuracy(model, data.test))
    mean = float(np.mean(accuracies))
    assert mean >= references[task]["plain"] - GRADIENT_WITHIN, (task, method, accuracies, references[task])
    assert min(accuracies) >= mean - SEED_BELOW, (task, method, accuracies)


# Verdicts where the answer is known by construction, on the known-answer CLIP and its shapes task.

def test_verdicts_of_runs_whose_answer_is_known(known_answer_dir):
    directory = known_answer_dir[0]
    data = known_answer.load_task(directory)
    _, fits = known_answer.train_method(directory, data, "E2_linear_probe", "--solver", "adamw", "--quiet")
    assert fits.verdict == "converged", fits.convergence_reason   # a task its head already fits
    _, capped = known_answer.train_method(directory, data, "E3_shallow_vpt", "--epochs", "3", "--head-start", "none",
                                          "--quiet")
    assert capped.verdict == "still-falling", capped.convergence_reason
    _, too_fast = known_answer.train_method(directory, data, "E3_shallow_vpt", "--lr", "30", "--quiet")
    assert too_fast.verdict == "diverging", too_fast.convergence_reason
