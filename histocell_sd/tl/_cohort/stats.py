"""Cohort statistics: indicators (samples × indicators) against survival and treatment response."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import anndata as ad
import numpy as np
import pandas as pd
from scipy import stats

from ..._errors import InvalidInputError
from .._spatial.indicators import indicator_family

__all__ = ["benjamini_hochberg", "response_association", "survival"]

MAX_LOG_HR = 10.0
"""Largest credible |log hazard ratio| per SD of an indicator; a larger fit means separation."""


def benjamini_hochberg(p: Sequence[float] | np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (FDR); NaN stays NaN.

    Parameters
    ----------
    p
        p-values (any shape).

    Returns
    -------
    numpy.ndarray
        The adjusted p-values, same shape, NaN where ``p`` is not finite.
    """
    p = np.asarray(p, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = stats.false_discovery_control(np.clip(p[ok], 0.0, 1.0), method="bh")
    return out


# ---------------------------------------------------------------------------- inputs
def _cohort_frame(
    indicators: ad.AnnData | pd.DataFrame,
    keys: Sequence[str],
    clinical: pd.DataFrame | None,
    subset: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Indicator values (samples × indicators) and the clinical ``keys``, aligned by sample id."""
    if isinstance(indicators, ad.AnnData):
        values, obs = indicators.to_df(), indicators.obs
    elif isinstance(indicators, pd.DataFrame):
        values, obs = indicators, indicators
    else:
        raise InvalidInputError(f"indicators must be an AnnData (samples × indicators) or a DataFrame, got {type(indicators).__name__}.")
    values = values.copy()
    values.index = values.index.astype(str)
    if subset is not None:
        missing = [s for s in subset if s not in values.columns]
        if missing:
            raise InvalidInputError(f"Unknown indicators {missing}; available e.g. {list(values.columns[:5])}.")
        values = values[list(subset)]
    if clinical is not None:
        if not isinstance(clinical, pd.DataFrame):
            raise InvalidInputError(f"clinical must be a DataFrame indexed by sample id, got {type(clinical).__name__}.")
        clin = clinical.copy()
        clin.index = clin.index.astype(str)
        missing_ids = values.index.difference(clin.index)
        if len(missing_ids):
            raise InvalidInputError(f"clinical has no row for samples {list(missing_ids[:5])} (index must be the sample ids).")
        clin = clin.loc[values.index]
    else:
        clin = obs.copy()
        clin.index = values.index
    for key in keys:
        if key not in clin.columns:
            where = "clinical" if clinical is not None else "indicators.obs (or pass clinical=DataFrame)"
            raise InvalidInputError(f"Column {key!r} not found in {where}; available: {list(clin.columns)}.")
    if isinstance(indicators, pd.DataFrame):
        clinical_columns = set(keys) | (set(clinical.columns) if clinical is not None and subset is None else set())
        dropped = [c for c in values.columns if c in clinical_columns]
        values = values.drop(columns=dropped)
        if values.shape[1] == 0 and dropped:
            raise InvalidInputError(f"No indicators to test: the columns {dropped[:5]} are clinical (keys or columns of clinical=).")
    values = values.select_dtypes(include=[np.number, bool]).astype(float)
    if isinstance(indicators, pd.DataFrame) and subset is None:
        other = [c for c in values.columns if indicator_family(str(c)) == "other"]
        if other and len(other) < values.shape[1]:
            warnings.warn(
                f"Columns {other[:5]}{' …' if len(other) > 5 else ''} are not spatial indicators but are tested as such; if they "
                "are clinical, pass them in clinical= (or an AnnData with them in obs), or choose the indicators with indicators_subset=.",
                UserWarning, stacklevel=3)
    if values.shape[1] == 0:
        raise InvalidInputError("No numeric indicators to test.")
    return values, clin[list(keys)]


def _usable(values: pd.DataFrame, min_samples: int = 3) -> tuple[pd.DataFrame, dict[str, str]]:
    """Drop indicators that are constant or almost all NaN, with the reason."""
    dropped = {}
    for name in values.columns:
        col = values[name].dropna()
        if len(col) < min_samples:
            dropped[name] = "NaN in (almost) all samples"
        elif np.nanstd(col.to_numpy()) <= 1e-12 * max(1.0, np.abs(col).max()):
            dropped[name] = "constant"
    return values.drop(columns=list(dropped)), dropped


def _standardise(x: np.ndarray) -> np.ndarray:
    mean = np.nanmean(x, axis=0)
    sd = np.nanstd(x, axis=0, ddof=1)
    return (x - mean) / np.where(sd > 0, sd, 1.0)


# ---------------------------------------------------------------------------- survival
def survival_columns(clin: pd.DataFrame, duration_key: str, event_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Follow-up times (positive) and events (0/1) as float arrays, or an error naming the column."""
    duration = pd.to_numeric(clin[duration_key], errors="coerce").to_numpy(dtype=float)
    try:
        event = clin[event_key].astype(float).to_numpy()
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"{event_key!r} must be 0/1 or boolean: {error}") from error
    if np.isnan(duration).any() or np.isnan(event).any():
        raise InvalidInputError(f"{duration_key!r} and {event_key!r} must have no missing values.")
    if (duration <= 0).any():
        raise InvalidInputError(f"{duration_key!r} must be positive.")
    if not set(np.unique(event)) <= {0.0, 1.0}:
        raise InvalidInputError(f"{event_key!r} must be 0/1 or boolean, got values {sorted(set(np.unique(event)))[:5]}.")
    return duration, event


def _cox_univariate(x: np.ndarray, duration: np.ndarray, event: np.ndarray, n_iter: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Univariate Cox fits (Breslow ties) of every column of ``x`` at once: coefficients and SEs.

    Newton–Raphson on the (concave) partial likelihood, vectorised over columns; a step is capped
    at 1 (in units of the standardised covariate) to stay stable near separation.
    """
    order = np.argsort(-duration, kind="stable")
    x, duration, event = x[order], duration[order], event[order].astype(bool)
    # Breslow risk set of sample i = all samples with duration >= duration_i: the last index of its tie group.
    last = np.searchsorted(-duration, -duration, side="right") - 1
    beta = np.zeros(x.shape[1])
    info = np.ones(x.shape[1])
    for _ in range(n_iter):
        w = np.exp(np.clip(x * beta, -50, 50))
        s0 = np.cumsum(w, axis=0)[last]
        s1 = np.cumsum(w * x, axis=0)[last]
        s2 = np.cumsum(w * x * x, axis=0)[last]
        mean = s1 / s0
        score = (x - mean)[event].sum(axis=0)
        info = (s2 / s0 - mean**2)[event].sum(axis=0)
        step = np.clip(score / np.maximum(info, 1e-12), -1.0, 1.0)
        beta = beta + step
        if np.all(np.abs(step) < 1e-9):
            break
    se = 1.0 / np.sqrt(np.maximum(info, 1e-12))
    return beta, se


def _separated(x: np.ndarray, duration: np.ndarray, event: np.ndarray) -> np.ndarray:
    """Columns whose Cox likelihood has no finite maximum: at every event the sample's value is the
    largest (or at every event the smallest) of its risk set, i.e. the covariate orders the event times."""
    order = np.argsort(-duration, kind="stable")
    x, duration, event = x[order], duration[order], event[order].astype(bool)
    last = np.searchsorted(-duration, -duration, side="right") - 1
    top = (x >= np.maximum.accumulate(x, axis=0)[last])[event].all(axis=0)
    bottom = (x <= np.minimum.accumulate(x, axis=0)[last])[event].all(axis=0)
    return top ^ bottom


def survival(
    indicators: ad.AnnData | pd.DataFrame,
    *,
    duration_key: str = "duration",
    event_key: str = "event",
    clinical: pd.DataFrame | None = None,
    indicators_subset: Sequence[str] | None = None,
    multivariate: bool = True,
    penalizer: float = 0.1,
    l1_ratio: float = 0.0,
    cv_folds: int = 5,
    seed: int = 0,
) -> pd.DataFrame:
    """Relate every indicator to survival: univariate Cox models with FDR, and a penalised multivariate Cox.

    Each indicator is standardised (mean 0, SD 1 over the samples where it is defined), so a
    hazard ratio is per standard deviation. Univariate Cox fits (Breslow ties: identical to
    ``statsmodels`` ``PHReg(ties="breslow")``, and to ``lifelines.CoxPHFitter``, which handles ties
    by Efron's method, when no two times are tied) give the hazard ratio, its 95 % CI and the Wald p;
    Benjamini–Hochberg adjusts the p-values over the indicators tested. The multivariate model is
    ``lifelines.CoxPHFitter(penalizer, l1_ratio)`` on all tested indicators without NaN, scored by
    the concordance index of ``cv_folds``-fold cross-validation.

    When an indicator orders the event times perfectly (every event has the highest, or every event
    the lowest, value of its risk set: complete or quasi-complete separation, common with few
    samples or events), the partial likelihood has no maximum and the hazard ratio would be
    infinite. Such indicators (and those with a fitted ``|log HR|`` above ``MAX_LOG_HR`` per SD, or
    fewer than two events among their samples) are reported with NaN ``hazard_ratio``, CI, ``p``
    and ``fdr`` and a :class:`UserWarning`, rather than a meaningless huge hazard ratio.

    Parameters
    ----------
    indicators
        Samples × indicators, from :func:`~histocell_sd.tl.spatial_indicators` (clinical columns in
        ``obs``) or a DataFrame, whose numeric columns are tested except the clinical ones (the keys and,
        unless ``indicators_subset`` names the columns, those of ``clinical``); other columns that are not
        spatial indicators are tested with a warning.
    duration_key, event_key
        Clinical columns of the follow-up time and of the event indicator (1/True = event).
    clinical
        Clinical DataFrame indexed by sample id, used instead of ``indicators.obs``.
    indicators_subset
        Test only these indicators.
    multivariate
        Also fit the penalised multivariate model (skip it for speed in screens).
    penalizer, l1_ratio
        Penalty of the multivariate model (``lifelines`` parameters; ``l1_ratio=0`` is ridge).
    cv_folds
        Folds of the cross-validated C-index (at most the number of samples).
    seed
        Seed of the fold assignment.

    Returns
    -------
    pandas.DataFrame
        DataFrame indexed by indicator, ranked by p: ``hazard_ratio``, ``ci_lower``, ``ci_upper``
        (95 %), ``coef`` (log HR per SD), ``se``, ``z``, ``p``, ``fdr``, ``n``, ``n_events``.
        ``attrs["dropped"]`` maps each untested indicator to the reason (constant, all NaN);
        ``attrs["not_estimable"]`` lists the indicators with NaN estimates (separation, see above);
        ``attrs["multivariate"]`` holds ``coef`` (dict indicator → penalised log HR per SD),
        ``c_index_cv`` (mean), ``c_index_folds``, ``penalizer``, ``l1_ratio``, ``n_samples``,
        ``indicators`` and ``excluded`` (indicators with NaN), or ``error`` when it could not be fit.
    """
    values, clin = _cohort_frame(indicators, [duration_key, event_key], clinical, indicators_subset)
    duration, event = survival_columns(clin, duration_key, event_key)
    if event.sum() < 2:
        raise InvalidInputError(f"At least two events are needed, got {int(event.sum())}.")
    values, dropped = _usable(values)
    if values.shape[1] == 0:
        raise InvalidInputError(f"No indicator left to test: {dropped}.")
    x = _standardise(values.to_numpy())
    nan_patterns = pd.DataFrame(np.isnan(x)).T.apply(lambda r: r.to_numpy().tobytes(), axis=1)
    coef, se, n, n_events = (np.full(x.shape[1], np.nan) for _ in range(4))
    unstable = np.zeros(x.shape[1], dtype=bool)
    for _, cols in nan_patterns.groupby(nan_patterns).groups.items():
        cols = np.asarray(list(cols))
        keep = ~np.isnan(x[:, cols[0]])
        xs = _standardise(x[keep][:, cols])
        b, s = _cox_univariate(xs, duration[keep], event[keep])
        coef[cols], se[cols], n[cols], n_events[cols] = b, s, keep.sum(), event[keep].sum()
        unstable[cols] = _separated(xs, duration[keep], event[keep]) | (np.abs(b) > MAX_LOG_HR) | (event[keep].sum() < 2)
    if unstable.any():
        names = list(values.columns[unstable])
        warnings.warn(
            f"The Cox fit has no finite estimate for {len(names)} indicators (e.g. {names[:3]}): each orders the event "
            "times perfectly (separation) or too few events remain, so the hazard ratio would be infinite; their "
            "hazard ratio, CI and p are NaN (listed in attrs['not_estimable']).",
            UserWarning,
            stacklevel=2,
        )
        coef[unstable] = se[unstable] = np.nan
    z = coef / se
    p = 2 * stats.norm.sf(np.abs(z))
    res = pd.DataFrame(
        {
            "hazard_ratio": np.exp(coef),
            "ci_lower": np.exp(coef - 1.959964 * se),
            "ci_upper": np.exp(coef + 1.959964 * se),
            "coef": coef,
            "se": se,
            "z": z,
            "p": p,
            "fdr": benjamini_hochberg(p),
            "n": n.astype(int),
            "n_events": n_events.astype(int),
        },
        index=pd.Index(values.columns, name="indicator"),
    )
    res = res.sort_values(["p", "fdr"], kind="stable")
    res.attrs["dropped"] = dropped
    res.attrs["not_estimable"] = list(values.columns[unstable])
    if multivariate:
        res.attrs["multivariate"] = _multivariate_cox(values, duration, event, penalizer, l1_ratio, cv_folds, seed)
    return res


def _multivariate_cox(values: pd.DataFrame, duration, event, penalizer, l1_ratio, cv_folds, seed) -> dict:
    """Penalised multivariate Cox (lifelines) with a cross-validated concordance index."""
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index

    complete = values.columns[values.notna().all()]
    excluded = [c for c in values.columns if c not in complete]
    x = pd.DataFrame(_standardise(values[complete].to_numpy()), index=values.index, columns=complete)
    df = x.assign(__duration=duration, __event=event)
    out = {"penalizer": float(penalizer), "l1_ratio": float(l1_ratio), "n_samples": len(df), "indicators": list(complete), "excluded": excluded}
    if not len(complete):
        return out | {"error": "no indicator without NaN"}
    folds = int(min(cv_folds, len(df)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(df, "__duration", "__event")
            out["coef"] = {str(k): float(v) for k, v in fit.params_.items()}
            scores = []
            if folds >= 2:
                rng = np.random.default_rng(seed)
                fold_of = rng.permutation(np.arange(len(df)) % folds)
                for k in range(folds):
                    train, test = df[fold_of != k], df[fold_of == k]
                    if test["__event"].sum() == 0 or train["__event"].sum() < 2:
                        continue
                    m = CoxPHFitter(penalizer=penalizer, l1_ratio=l1_ratio).fit(train, "__duration", "__event")
                    risk = m.predict_partial_hazard(test).to_numpy()
                    scores.append(float(concordance_index(test["__duration"], -risk, test["__event"])))
    except Exception as error:  # noqa: BLE001 - lifelines raises several convergence error types
        return out | {"error": f"{type(error).__name__}: {error}"}
    out["c_index_folds"] = scores
    out["c_index_cv"] = float(np.mean(scores)) if scores else float("nan")
    return out


# ---------------------------------------------------------------------------- response
def _response_kind(y: pd.Series, key: str) -> tuple[str, np.ndarray]:
    if y.isna().any():
        raise InvalidInputError(f"Response {key!r} has {int(y.isna().sum())} missing values; drop or impute those samples first.")
    if y.dtype == bool or isinstance(y.dtype, pd.CategoricalDtype) or y.dtype == object or y.nunique() <= 2:
        classes = pd.unique(y)
        if len(classes) < 2:
            raise InvalidInputError(f"Response {key!r} has fewer than 2 classes ({list(classes)}).")
        if len(classes) > 2:
            raise InvalidInputError(f"Response {key!r} is categorical with {len(classes)} classes; give a binary or a continuous response.")
        if y.dtype == bool or set(classes) <= {0, 1}:
            positive = True if y.dtype == bool else 1
        else:
            positive = sorted(classes, key=str)[-1]
        return "binary", (y == positive).to_numpy()
    try:
        return "continuous", y.astype(float).to_numpy()
    except (TypeError, ValueError) as error:
        raise InvalidInputError(f"Response {key!r} is neither binary nor numeric: {error}") from error


def _associate(values: pd.DataFrame, y: pd.Series, key: str) -> pd.DataFrame:
    """Effect size and p of every column of ``values`` against a binary or continuous ``y``."""
    from sklearn.metrics import roc_auc_score

    kind, target = _response_kind(y, key)
    rows = {}
    for name in values.columns:
        x = values[name].to_numpy(dtype=float)
        ok = ~np.isnan(x)
        xs, ts = x[ok], target[ok]
        if kind == "binary":
            if len(np.unique(ts)) < 2:
                rows[name] = (np.nan, np.nan, ok.sum())
                continue
            auc = roc_auc_score(ts, xs)
            p = stats.mannwhitneyu(xs[ts], xs[~ts], alternative="two-sided").pvalue
            rows[name] = (auc, p, ok.sum())
        else:
            rho, p = stats.spearmanr(xs, ts)
            rows[name] = (rho, p, ok.sum())
    effect = "auc" if kind == "binary" else "spearman_rho"
    res = pd.DataFrame.from_dict(rows, orient="index", columns=[effect, "p", "n"])
    res["fdr"] = benjamini_hochberg(res["p"])
    null, value = (0.5 if kind == "binary" else 0.0), res[effect].to_numpy(dtype=float)
    res["direction"] = pd.Series(np.select([value > null, value < null, value == null], ["higher", "lower", "none"], "n/a"), index=res.index)
    res["n"] = res["n"].astype(int)
    res = res[[effect, "direction", "p", "fdr", "n"]].sort_values(["p"], kind="stable", na_position="last")
    res.attrs["kind"] = kind
    res.attrs["effect"] = effect
    return res


def response_association(
    indicators: ad.AnnData | pd.DataFrame,
    *,
    response_key: str,
    clinical: pd.DataFrame | None = None,
    indicators_subset: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Associate every indicator with a treatment response (binary or continuous), with FDR.

    A response with two values (bool, 0/1 or two labels; the positive class is True, 1 or the
    label sorting last) is binary: effect = ROC AUC of the indicator for the positive class
    (0.5 = none, > 0.5 = higher in responders), p = two-sided Mann–Whitney U. Otherwise it is
    continuous: effect = Spearman rho, p = its test. Benjamini–Hochberg over the indicators.

    Parameters
    ----------
    indicators
        Samples × indicators (:func:`~histocell_sd.tl.spatial_indicators` output, response in
        ``obs``) or a DataFrame, whose numeric columns are tested except the clinical ones (the keys and,
        unless ``indicators_subset`` names the columns, those of ``clinical``); other columns that are not
        spatial indicators are tested with a warning.
    response_key
        Column of the response.
    clinical
        Clinical DataFrame indexed by sample id, used instead of ``indicators.obs``.
    indicators_subset
        Test only these indicators.

    Returns
    -------
    pandas.DataFrame
        DataFrame indexed by indicator, ranked by p: ``auc`` or ``spearman_rho``, ``direction``
        (higher / lower with response; "none" at no effect, "n/a" where it is undefined), ``p``, ``fdr``, ``n``; ``attrs`` ``kind`` (binary /
        continuous), ``effect`` (the effect column) and ``dropped`` (constant / NaN indicators).
    """
    values, clin = _cohort_frame(indicators, [response_key], clinical, indicators_subset)
    values, dropped = _usable(values)
    if values.shape[1] == 0:
        raise InvalidInputError(f"No indicator left to test: {dropped}.")
    res = _associate(values, clin[response_key], response_key)
    res.index.name = "indicator"
    res.attrs["dropped"] = dropped
    return res
