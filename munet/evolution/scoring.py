"""muNet's score with scale control: quality traded against the parameters a path adds."""

from __future__ import annotations

import functools
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


@functools.lru_cache(maxsize=64)
def selection_bias_se(contenders: int) -> float:
    """The expected maximum of `contenders` independent standard normals: by how many standard errors
    the best of that many candidates of the incumbent's true quality looks better than it on
    validation (0 for one, 0.56 for two, 1.03 for four, 1.42 for eight).

    The promotion margin is this bias, scaled by `promotion_margin_se`: what the choice of the best
    candidate adds to validation noise, the winner's curse. A lone candidate was not chosen from
    others, so its validation gain is an unbiased estimate of its test gain and the absolute floor
    alone guards it; four candidates (the server's default) ask one standard error, the margin
    `munet bench margin` measured."""
    if contenders <= 1:
        return 0.0
    x = np.linspace(-9.0, 9.0, 18001)
    cdf = 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return float(np.sum(x * contenders * pdf * cdf ** (contenders - 1)) * (x[1] - x[0]))
