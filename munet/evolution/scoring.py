"""muNet's score with scale control: quality traded against the parameters a path adds."""

from __future__ import annotations

import math

import numpy as np


def score(quality: float, accounted: float, root_params: int, base: float) -> float:
    """score = quality * base ** (accounted params / root params); base 1.0 means no size penalty.

    `accounted`: munet.models.accounting.accounted_params, the figure GetTask reports for the path."""
    return float(quality) * float(base) ** (accounted / max(1, root_params))


def paired_margin(incumbent_pred: np.ndarray, candidate_pred: np.ndarray, y: np.ndarray, standard_errors: float,
                  floor: float) -> float:
    """How much higher a candidate's validation accuracy must be to replace the incumbent's:
    `standard_errors` standard errors of the difference of the two accuracies, and at least `floor`.

    Both answer the same validation images, so the difference is paired: only the images where
    exactly one of them is right carry noise (McNemar), far fewer than the binomial error of either
    accuracy alone when the two mostly agree. Without a margin, versions of equal quality replace
    each other on validation noise (README: "Operators in control")."""
    n = len(y)
    if n == 0:
        return floor
    d = (candidate_pred == y).astype(np.float64) - (incumbent_pred == y)
    se = math.sqrt(max(float((d * d).sum()) - float(d.sum()) ** 2 / n, 1.0) / n) / math.sqrt(n)
    return max(floor, standard_errors * se)
