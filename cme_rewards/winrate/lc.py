"""Length-controlled win rate: a logistic model of the judge's preference on the length difference.

Fitted per (model, baseline, judge) by maximum likelihood, the preference ``q`` in [0, 1] a soft
target (as AlpacaEval fits its GLM): ``logit P(model wins | prompt i) = theta + phi *
tanh(delta_i / sigma)``, with ``delta_i = len(output_model) - len(output_baseline)`` (characters) and
``sigma`` its standard deviation over the prompts (ddof=1, fixed per group, also in the bootstrap).
The LC win rate is ``100 * sigmoid(theta)``, the predicted rate at zero length difference.

AlpacaEval's ``length_controlled_v1`` fits the same ``tanh`` term (with the opposite sign of
``delta``) but adds an instruction-difficulty term fitted on the whole leaderboard, regularises
toward "gamed" baselines and uses a cross-validated L1 penalty; this is the single-comparison
version of the idea, not the published number (the tests measure how far apart they are).

Prompts are the unit: ``s_i`` sums ``q`` over the prompt's ``c_i`` judgments (exact, as they share
its length difference). A ridge of ``1e-6 * sum(c)`` keeps the fit finite on separated data.
"""

from __future__ import annotations

import numpy as np

RIDGE = 1e-6
MAX_ITER = 50
TOL = 1e-10


def length_feature(len_diff: np.ndarray) -> np.ndarray:
    """``tanh(delta / std(delta))`` per prompt, ``[n_prompts]``; zeros when the std is 0."""
    sigma = float(np.std(len_diff, ddof=1)) if len_diff.size > 1 else 0.0
    if not np.isfinite(sigma) or sigma == 0.0:
        return np.zeros_like(len_diff, dtype=float)
    return np.tanh(len_diff / sigma)


def fit_logistic(
    s: np.ndarray, c: np.ndarray, x: np.ndarray, start: tuple[float, float] = (0.0, 0.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Newton fit of ``logit p = theta + phi * x`` to soft counts, vectorised over leading axes.

    ``s``, ``c``, ``x``: ``[..., n_prompts]`` (``s`` successes as sums of preferences, ``c``
    judgments per prompt, ``x`` the length feature). Returns ``(theta, phi)``, each ``[...]``.
    """
    s, c, x = np.broadcast_arrays(s, c, x)
    batch = s.shape[:-1]
    theta = np.full(batch, float(start[0]))
    phi = np.full(batch, float(start[1]))
    ridge = RIDGE * c.sum(axis=-1)
    xx = x * x
    for _ in range(MAX_ITER):
        p = 1.0 / (1.0 + np.exp(-(theta[..., None] + phi[..., None] * x)))
        cp = c * p
        r = s - cp
        w = cp * (1.0 - p)
        g0 = r.sum(axis=-1) - ridge * theta
        g1 = (r * x).sum(axis=-1) - ridge * phi
        h00 = w.sum(axis=-1) + ridge
        h01 = (w * x).sum(axis=-1)
        h11 = (w * xx).sum(axis=-1) + ridge
        det = h00 * h11 - h01 * h01
        d0 = (h11 * g0 - h01 * g1) / det
        d1 = (h00 * g1 - h01 * g0) / det
        # Damp steps so that a far start or near-separated data cannot overshoot into overflow.
        scale = np.minimum(1.0, 5.0 / np.maximum(np.abs(d0), np.abs(d1)).clip(min=1e-300))
        theta = theta + scale * d0
        phi = phi + scale * d1
        if np.max(np.abs(scale * d0)) < TOL and np.max(np.abs(scale * d1)) < TOL:
            break
    return theta, phi


def lc_win_rate(s: np.ndarray, c: np.ndarray, x: np.ndarray, start=(0.0, 0.0)) -> np.ndarray:
    """Length-controlled win rate in percent, ``[...]`` for inputs ``[..., n_prompts]``."""
    theta, _ = fit_logistic(s, c, x, start)
    return 100.0 / (1.0 + np.exp(-theta))
