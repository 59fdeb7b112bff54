"""Summary statistics with confidence intervals, a paired bootstrap test and the power of a paired comparison.

``summarize`` is "mean of a few numbers with a t interval" (e.g. over sampling seeds); ``bootstrap_mean`` is the
mean of per-prompt scores with a bootstrap interval over prompts (the evaluation's CIs); ``paired_bootstrap``
compares two systems scored on the same prompts (e.g. per-prompt ROUGE-L of model A and model B), and
``paired_on_common_ids`` does so on the prompts two score tables share; ``min_detectable_difference`` is the
smallest true difference such a paired comparison detects at a given power. Both bootstraps draw their
resamples in one place (``_resampled_means``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence

import numpy as np

__all__ = ["summarize", "bootstrap_mean", "paired_bootstrap", "paired_on_common_ids", "min_detectable_difference"]

N_RESAMPLES = 10_000  # bootstrap resamples: Monte-Carlo error of a 95 % percentile end ~1 % of the CI width


def _as_1d(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name}: need at least one value")
    return arr


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def summarize(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std and a Student-t confidence interval for the mean.

    Args:
        values: n >= 1 numbers (e.g. one score per seed).
        confidence: two-sided level of the interval.

    Returns:
        ``{"mean", "std", "n", "ci_low", "ci_high"}`` where ``std`` uses ddof=1 and the interval is
        ``mean +/- t_{(1+confidence)/2, n-1} * std / sqrt(n)``. For n = 1: std = 0 and the interval is
        ``[mean, mean]`` (no spread can be estimated from one value; read it as "unknown", not "exact").
        NaN inputs propagate to NaN outputs.
    """
    from scipy import stats as sps

    _check_confidence(confidence)
    arr = _as_1d(values, "summarize")
    n = int(arr.size)
    mean = float(arr.mean())
    if n == 1:
        return {"mean": mean, "std": 0.0, "n": 1, "ci_low": mean, "ci_high": mean}
    std = float(arr.std(ddof=1))
    half = float(sps.t.ppf(0.5 + confidence / 2.0, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "n": n, "ci_low": mean - half, "ci_high": mean + half}


def _resampled_means(x: np.ndarray, n_resamples: int, seed: int) -> np.ndarray:
    """R = ``n_resamples`` bootstrap means of ``x``: for r = 1..R, n indices drawn with replacement
    (``numpy.random.default_rng(seed).integers``), mean of x over them. The (R, n) index matrix is drawn in
    chunks of ~1e6 entries (~8 MB), so memory stays bounded and the draws depend on (seed, n, R) only."""
    if n_resamples < 1:
        raise ValueError(f"bootstrap: n_resamples must be >= 1, got {n_resamples}")
    n = x.size
    rng = np.random.default_rng(seed)
    boot = np.empty(n_resamples, dtype=np.float64)
    chunk = max(1, min(n_resamples, 1_000_000 // max(n, 1)))
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = x[idx].mean(axis=1)
    return boot


def _percentile_ci(boot: np.ndarray, confidence: float) -> tuple[float, float]:
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    return float(lo), float(hi)


def bootstrap_mean(
    values: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Mean of per-prompt scores with a percentile bootstrap interval over prompts.

    ``values[i]`` is prompt i's score (for sampled metrics, already averaged over the sampling seeds, so
    the prompts are the resampled unit and the seeds' noise is inside each prompt's value). The interval is
    the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of R bootstrap means (``_resampled_means``,
    fixed ``seed``: the same scores give the same interval). For n = 1 the interval is ``[mean, mean]``.

    Returns:
        ``{"mean", "ci_low", "ci_high", "n"}``. Scores must be finite.
    """
    _check_confidence(confidence)
    x = _as_1d(values, "bootstrap_mean")
    if not np.isfinite(x).all():
        raise ValueError("bootstrap_mean: scores must be finite")
    mean = float(x.mean())
    if x.size == 1:
        return {"mean": mean, "ci_low": mean, "ci_high": mean, "n": 1}
    lo, hi = _percentile_ci(_resampled_means(x, n_resamples, seed), confidence)
    return {"mean": mean, "ci_low": lo, "ci_high": hi, "n": int(x.size)}


def min_detectable_difference(sd_diff: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference a two-sided paired test at level ``alpha`` detects with probability
    ``power``, given the standard deviation of the per-prompt differences ``sd_diff`` over ``n`` prompts
    (normal approximation to the paired t-test, exact enough for n >= 30):

        MDE = (z_{1 - alpha/2} + z_{power}) * sd_diff / sqrt(n)

    (z = standard normal quantiles; at alpha = 0.05 and power = 0.8 the factor is 1.960 + 0.842 = 2.802).
    NaN for n < 2.
    """
    from statistics import NormalDist  # (not scipy: a compare stage that needs no other scipy skips its import)

    if not 0.0 < alpha < 1.0 or not 0.0 < power < 1.0:
        raise ValueError(f"min_detectable_difference: alpha and power must be in (0, 1), got {alpha}, {power}")
    if n < 2:
        return float("nan")
    z = NormalDist().inv_cdf
    return float((z(1.0 - alpha / 2.0) + z(power)) * sd_diff / math.sqrt(n))


def paired_bootstrap(
    scores_a: Sequence[float] | np.ndarray,
    scores_b: Sequence[float] | np.ndarray,
    n_resamples: int = N_RESAMPLES,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, float]:
    """Paired bootstrap over prompts for the mean difference ``b - a``.

    ``scores_a[i]`` and ``scores_b[i]`` must be the two systems' scores on the same prompt i.

    Estimator (documented exactly):
        d_i = b_i - a_i, observed statistic D = mean(d). For r = 1..R (R = ``n_resamples``) draw n prompt
        indices with replacement (``_resampled_means``, ``numpy.random.default_rng(seed)``) and compute
        D*_r = mean(d[idx_r]).

        - CI: percentile interval, the ``(1-confidence)/2`` and ``(1+confidence)/2`` quantiles of D*
          (numpy's default linear interpolation).
        - p-value (two-sided, H0: E[d] = 0): the bootstrap distribution is shifted to have mean 0 under H0
          (D* - D), and  p = (1 + #{r : |D*_r - D| >= |D|}) / (R + 1)
          (Efron & Tibshirani 1993, sec. 16.4 shift method; the +1 keeps p > 0 (Davison & Hinkley 1997)).
          Identical scores give D = 0 and p = 1; the smallest reportable p is 1 / (R + 1).
        - power: ``sd_diff`` = sample SD of d (ddof = 1) and ``mde`` = ``min_detectable_difference(sd_diff, n)``,
          the difference this many prompts detect at 80 % power, alpha = 0.05.

    Returns:
        ``{"mean_diff", "ci_low", "ci_high", "p_value", "sd_diff", "mde"}`` (floats) plus ``"n"`` (prompts).
    """
    _check_confidence(confidence)
    a = _as_1d(scores_a, "paired_bootstrap(scores_a)")
    b = _as_1d(scores_b, "paired_bootstrap(scores_b)")
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: {a.size} scores for a but {b.size} for b (must be paired)")
    if n_resamples < 1:
        raise ValueError(f"paired_bootstrap: n_resamples must be >= 1, got {n_resamples}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("paired_bootstrap: scores must be finite")
    d = b - a
    n = d.size
    observed = float(d.mean())
    boot = _resampled_means(d, n_resamples, seed)
    ci_low, ci_high = _percentile_ci(boot, confidence)
    # Tolerance so that floating-point noise in resampled means of identical values counts as "as extreme".
    tol = 1e-12 * max(1.0, float(np.abs(d).max()))
    extreme = int(np.count_nonzero(np.abs(boot - observed) >= abs(observed) - tol))
    p_value = (1.0 + extreme) / (n_resamples + 1.0)
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    return {
        "mean_diff": observed,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "p_value": float(min(1.0, p_value)),
        "sd_diff": sd,
        "mde": min_detectable_difference(sd, n),
        "n": int(n),
    }


def paired_on_common_ids(
    scores_a: Mapping[Hashable, float | None],
    scores_b: Mapping[Hashable, float | None],
    seed: int = 0,
) -> dict[str, float] | None:
    """``paired_bootstrap`` of b against a over the ids both score (a score of None counts as missing).

    The ids are taken in ``scores_a``'s order. Returns its dict (``mean_diff`` = mean of b - a, ``ci_low``,
    ``ci_high``, ``p_value``, ``sd_diff``, ``mde``, ``n`` = the number of common ids), or None when fewer than
    2 ids are common.
    """
    ids = [i for i in scores_a if scores_a[i] is not None and scores_b.get(i) is not None]
    if len(ids) < 2:
        return None
    return paired_bootstrap([scores_a[i] for i in ids], [scores_b[i] for i in ids], seed=seed)
