"""Is the anticorrelation in the search region more than chance? (surrogate null).

A seed map always has a most negative spot: with a few hundred band-passed
frames (effective degrees of freedom ~ 2 x band width x duration, about 90
for 8 minutes of 0.01-0.1 Hz) and a search region of a few thousand voxels,
chance alone gives smoothed r around -0.2 to -0.3 somewhere. The split-half
and drift rules cannot tell that apart from a real cluster once the noise map
happens to hold still, so a target is only called stable when its
anticorrelation beats a null that has the same smoothness in time and space
and the same search:

- the nuisance-regressed, band-passed seed course is phase-randomised
  (Theiler et al. 1992, Physica D: same amplitude spectrum, so the same
  autocorrelation and effective degrees of freedom, but no relation to any
  voxel), regressed on the same nuisance design again, and correlated with
  the unchanged voxel residuals; the voxels keep their real spatial
  smoothness and covariance;
- each surrogate map is smoothed in the region exactly as the real one and
  its most negative value kept (the maximum statistic: the null of "the most
  negative spot in the search region", which corrects for having searched,
  Nichols & Holmes 2002, Human Brain Mapping);
- ``p = (1 + #{null min <= observed min}) / (1 + n)`` (Phipson & Smyth
  2010): never 0, exact for exchangeable surrogates.

The surrogates are drawn from a generator seeded by the frame count, so the
same data give the same p live and in replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from boldstream.errors import AnalysisError

__all__ = ["NullTest", "max_statistic_test", "phase_randomised", "surrogate_correlations"]

F64 = npt.NDArray[np.float64]


def phase_randomised(series: npt.ArrayLike, n: int, rng: np.random.Generator) -> F64:
    """``n`` surrogates (n, T) of ``series`` with its amplitude spectrum and random phases.

    The mean (frequency 0) and, for even ``T``, the Nyquist term keep their
    phase so the surrogates stay real and have the series' mean.
    """
    x = np.asarray(series, dtype=np.float64).reshape(-1)
    t = x.size
    if n < 1 or t < 4:
        raise AnalysisError(f"phase randomisation needs n >= 1 and >= 4 samples, not {n}, {t}")
    spectrum = np.fft.rfft(x)
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(n, spectrum.size))
    phases[:, 0] = 0.0
    if t % 2 == 0:
        phases[:, -1] = 0.0
    out: F64 = np.fft.irfft(np.abs(spectrum) * np.exp(1j * phases), n=t, axis=1)
    return out


def surrogate_correlations(
    voxels: npt.ArrayLike,
    seed: npt.ArrayLike,
    basis: npt.ArrayLike,
    n: int,
    rng: np.random.Generator,
) -> F64:
    """Correlations (n, V) of ``n`` phase-randomised seeds with the voxel residuals.

    ``voxels`` (T, V) and ``seed`` (T,) are residuals of the nuisance design
    whose orthonormal basis (with the intercept) is ``basis`` (T, q); each
    surrogate seed is projected off that basis again before correlating, as
    the real seed was.
    """
    y = np.asarray(voxels, dtype=np.float64)
    q = np.asarray(basis, dtype=np.float64)
    surrogates = phase_randomised(seed, n, rng)
    surrogates -= (surrogates @ q) @ q.T
    s_norm = np.linalg.norm(surrogates, axis=1, keepdims=True)
    y_norm = np.linalg.norm(y, axis=0)
    out = np.full((n, y.shape[1]), np.nan)
    ok = y_norm > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out[:, ok] = (surrogates / s_norm) @ (y[:, ok] / y_norm[ok])
    return out


@dataclass(frozen=True, slots=True)
class NullTest:
    """How the most negative smoothed r of the region compares with its surrogate null."""

    #: Most negative smoothed r in the search region.
    observed: float
    #: Permutation p (one-sided: as negative or more by chance).
    p: float
    #: The null's 5th percentile of the most negative r (the bar at p = 0.05).
    null_p05: float
    surrogates: int


def max_statistic_test(observed_min: float, null_mins: npt.ArrayLike) -> NullTest:
    """The permutation test of ``observed_min`` against the surrogates' minima."""
    null = np.asarray(null_mins, dtype=np.float64).reshape(-1)
    null = null[np.isfinite(null)]
    if null.size == 0 or not np.isfinite(observed_min):
        raise AnalysisError("the null test needs a finite observed value and surrogates")
    exceed = int(np.count_nonzero(null <= observed_min))
    return NullTest(
        observed=float(observed_min),
        p=(1 + exceed) / (1 + null.size),
        null_p05=float(np.percentile(null, 5.0)),
        surrogates=int(null.size),
    )
