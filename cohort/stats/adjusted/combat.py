"""ComBat: location/scale harmonisation of features across batches, parametric empirical Bayes.

As neuroCombat defines it (Fortin et al. 2017, 2018; after Johnson et al.
2007), on a subjects x features matrix Y with a batch (site, scanner) per
subject and preserved terms (cohort and covariates) whose effects are kept:

1. Least squares of Y on D = [batch one-hot, preserved columns]: categorical
   terms as dummies of their levels (sorted, the first left out), continuous
   ones as they are. The grand mean is the batch coefficients weighted by the
   batch sizes; the pooled variance the mean squared residual (over n).
2. Standardise: s = (Y - grand mean - preserved effects) / sqrt(pooled variance).
3. Per batch and feature, gamma_hat = the batch's mean of s and delta_hat its
   variance (ddof 1; a zero becomes 1); per batch, priors over the features:
   gamma ~ N(gamma_bar, t^2), delta ~ InvGamma(a, b) by the method of moments.
4. Posterior means gamma*, delta* by the fixed-point iteration of Johnson et al.
   until the largest relative change is at most 1e-4 (neuroCombat's ``it_sol``).
5. Harmonised: (s - gamma*) / sqrt(delta*) x sqrt(pooled variance) + grand mean
   + preserved effects.

A feature whose pooled variance is 0 (the model explains it exactly, e.g. a
channel that is 0 in every subject) is left as it is and out of the priors.
The fitted model (:class:`ComBatModel`) applies to new subjects without
refitting (:meth:`ComBatModel.apply`: their batches must be among the fitted
ones, their preserved terms take the fitted levels), as neuroHarmonize's
``applyModelOnly`` does.

References
----------
Johnson, W. E., Li, C., & Rabinovic, A. (2007). Adjusting batch effects in
microarray expression data using empirical Bayes methods. Biostatistics, 8(1),
118-127.

Fortin, J.-P., et al. (2017). Harmonization of multi-site diffusion tensor
imaging data. NeuroImage, 161, 149-170.

Fortin, J.-P., et al. (2018). Harmonization of cortical thickness measurements
across scanners and sites. NeuroImage, 167, 104-120.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from cohort.errors import StatsInputError
from cohort.stats.common import FloatArray

__all__ = ["ComBatModel", "Term", "combat_fit"]

_CONVERGED: Final = 1e-4  # neuroCombat's it_sol ``conv``
_MAX_ITERATIONS: Final = 10_000
_META: Final = b"cohort.combat"


@dataclass(frozen=True)
class Term:
    """A preserved term: categorical (dummies of ``levels[1:]``) or continuous."""

    name: str
    kind: Literal["continuous", "categorical"]
    levels: tuple[str, ...] = ()

    def columns(self, values: Sequence[Any], what: str) -> FloatArray:
        """The term's design columns for ``values`` (a level outside ``levels`` is an error)."""
        if self.kind == "continuous":
            return np.asarray(values, dtype=np.float64).reshape(-1, 1)
        text = np.asarray([str(v) for v in values], dtype=object)
        unknown = sorted(set(text.tolist()) - set(self.levels))
        if unknown:
            raise StatsInputError(
                f"{what}: {self.name} takes the value(s) {', '.join(unknown)}, which the fitted "
                f"ComBat model does not know (it was fitted with {', '.join(self.levels)}); "
                "harmonise these subjects with a model fitted on them (--harmonise)"
            )
        return np.column_stack([text == level for level in self.levels[1:]]).astype(np.float64)


@dataclass(frozen=True)
class ComBatModel:
    """A fitted ComBat model (features in the order they were fitted)."""

    batch: str  # the batch column's name
    batches: tuple[str, ...]  # sorted
    terms: tuple[Term, ...]  # preserved terms, in design order
    grand_mean: FloatArray  # (features,)
    var_pooled: FloatArray  # (features,)
    beta: FloatArray  # (preserved columns, features)
    gamma: FloatArray  # (batches, features): gamma*
    delta: FloatArray  # (batches, features): delta*
    fitted: npt.NDArray[np.bool_]  # (features,): False = left as it is (no variance)
    subjects: int  # subjects fitted

    def apply(
        self, data: FloatArray, batches: Sequence[str], values: Mapping[str, Sequence[Any]]
    ) -> FloatArray:
        """Harmonise ``data`` (subjects x features) of subjects in ``batches`` with the
        preserved ``values`` (term name -> one value per subject), without refitting."""
        what = f"ComBat on {self.batch}"
        if data.shape[1] != self.grand_mean.size:
            raise StatsInputError(
                f"{what}: the fitted model has {self.grand_mean.size} features, these data "
                f"{data.shape[1]}; apply it to a run with the same layers, regions and channels"
            )
        unknown = sorted(set(batches) - set(self.batches))
        if unknown:
            raise StatsInputError(
                f"{what}: batch(es) {', '.join(unknown)} are not in the fitted model (it knows "
                f"{', '.join(self.batches)}); refit with --harmonise on data that include them"
            )
        code = np.searchsorted(np.asarray(self.batches, dtype=object), np.asarray(batches))
        mod_mean = _preserved(self.terms, values, data.shape[0], what) @ self.beta
        scale = np.sqrt(self.var_pooled)
        standard = (data - self.grand_mean - mod_mean) / np.where(self.fitted, scale, 1.0)
        adjusted = (standard - self.gamma[code]) / np.sqrt(self.delta[code])
        out = adjusted * scale + self.grand_mean + mod_mean
        return np.where(self.fitted, out, data)

    def to_table(self, keys: Mapping[str, Sequence[Any]]) -> pa.Table:
        """The model as a table, one row per feature (``keys``: columns naming each
        feature, e.g. layer, region, channel), its settings in the schema metadata."""
        columns: dict[str, Any] = {name: list(values) for name, values in keys.items()}
        columns |= {
            "fitted": self.fitted.tolist(),
            "grand_mean": self.grand_mean,
            "var_pooled": self.var_pooled,
            "gamma": list(self.gamma.T),
            "delta": list(self.delta.T),
            "beta": list(self.beta.T),
        }
        meta = {
            "batch": self.batch,
            "batches": list(self.batches),
            "terms": [
                {"name": t.name, "type": t.kind, "levels": list(t.levels)} for t in self.terms
            ],
            "subjects": self.subjects,
            "method": "ComBat, parametric empirical Bayes (neuroCombat's definition)",
        }
        table = pa.table(
            {
                k: pa.array(v, pa.list_(pa.float64())) if k in ("gamma", "delta", "beta") else v
                for k, v in columns.items()
            }
        )
        return table.replace_schema_metadata({_META: json.dumps(meta)})

    @classmethod
    def from_table(cls, table: pa.Table, where: str) -> ComBatModel:
        """The model :meth:`to_table` wrote (``where`` names the file, for messages)."""
        raw = (table.schema.metadata or {}).get(_META)
        if raw is None:
            raise StatsInputError(
                f"{where} holds no ComBat model (its metadata lacks {_META.decode()}); give the "
                "folder of a run made with --harmonise"
            )
        meta = json.loads(raw)
        terms = tuple(Term(t["name"], t["type"], tuple(t["levels"])) for t in meta["terms"])

        def stacked(name: str) -> FloatArray:
            values = table.column(name).to_pylist()
            return np.asarray(values, dtype=np.float64).T.reshape(-1, len(values))

        return cls(
            batch=str(meta["batch"]),
            batches=tuple(meta["batches"]),
            terms=terms,
            grand_mean=table.column("grand_mean").to_numpy().astype(np.float64),
            var_pooled=table.column("var_pooled").to_numpy().astype(np.float64),
            beta=stacked("beta"),
            gamma=stacked("gamma"),
            delta=stacked("delta"),
            fitted=np.asarray(table.column("fitted").to_pylist(), dtype=bool),
            subjects=int(meta["subjects"]),
        )


def _preserved(
    terms: Sequence[Term], values: Mapping[str, Sequence[Any]], n: int, what: str
) -> FloatArray:
    """The preserved design columns of ``n`` subjects with the terms' ``values``."""
    blocks = [term.columns(values[term.name], what) for term in terms]
    return np.hstack(blocks) if blocks else np.zeros((n, 0))


def _priors(delta_hat: FloatArray) -> tuple[float, float]:
    m, s2 = float(delta_hat.mean()), float(delta_hat.var(ddof=1))
    return (2.0 * s2 + m * m) / s2, (m * s2 + m**3) / s2


def _posterior(
    s: FloatArray, g_hat: FloatArray, d_hat: FloatArray, g_bar: float, t2: float, a: float, b: float
) -> tuple[FloatArray, FloatArray]:
    """gamma*, delta* of one batch (s: its subjects x features), Johnson et al.'s iteration."""
    n = np.isfinite(s).sum(axis=0).astype(np.float64)
    g_old, d_old = g_hat.copy(), d_hat.copy()
    for _ in range(_MAX_ITERATIONS):
        g_new = (t2 * n * g_hat + d_old * g_bar) / (t2 * n + d_old)
        sum2 = ((s - g_new) ** 2).sum(axis=0)
        d_new = (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            change = max(
                float((np.abs(g_new - g_old) / g_old).max()),
                float((np.abs(d_new - d_old) / d_old).max()),
            )
        g_old, d_old = g_new, d_new
        if not change > _CONVERGED:  # as neuroCombat: stops on NaN too
            return g_new, d_new
    raise StatsInputError(
        f"ComBat's empirical Bayes iteration did not converge in {_MAX_ITERATIONS} steps; the "
        "features may be degenerate (check the sanity flags)"
    )


def combat_fit(
    data: FloatArray,
    batches: Sequence[str],
    terms: Sequence[Term],
    values: Mapping[str, Sequence[Any]],
    batch: str,
) -> tuple[ComBatModel, FloatArray]:
    """Fit ComBat to ``data`` (subjects x features) and return the model and the
    harmonised data.

    Parameters
    ----------
    data : ndarray
        Finite values, one row per subject.
    batches : sequence of str
        Each subject's batch; every batch needs at least 2 subjects.
    terms : sequence of Term
        Preserved terms (cohort, covariates), with the levels to code them by.
    values : mapping
        Each term's value per subject.
    batch : str
        The batch column's name, for messages and the model.

    Returns
    -------
    model : ComBatModel
    harmonised : ndarray
        ``model.apply(data, batches, values)``.
    """
    n = data.shape[0]
    names, codes, sizes = np.unique(np.asarray(batches), return_inverse=True, return_counts=True)
    small = [f"{b} ({s} subject)" for b, s in zip(names, sizes, strict=True) if s < 2]
    if small:
        raise StatsInputError(
            f"ComBat on {batch}: batch(es) with fewer than 2 subjects: {', '.join(small)}; a "
            "batch effect cannot be estimated from one subject: merge it with a similar batch "
            "in the column, or leave those subjects out"
        )
    if names.size < 2:
        raise StatsInputError(
            f"ComBat on {batch}: every subject is in one batch ({names[0]}); there is nothing to "
            "harmonise: drop --harmonise"
        )
    onehot = np.zeros((n, names.size))
    onehot[np.arange(n), codes] = 1.0
    mod = _preserved(terms, values, n, f"ComBat on {batch}")
    design = np.hstack([onehot, mod])
    if np.linalg.matrix_rank(design) < design.shape[1]:
        raise StatsInputError(
            f"ComBat on {batch}: the preserved terms ({', '.join(t.name for t in terms)}) are "
            f"confounded with {batch} (e.g. a cohort measured at one {batch} only), so the "
            f"{batch} effect cannot be told from theirs; harmonising would remove real "
            "differences. Drop --harmonise or add subjects that cross batches"
        )
    coef, *_ = np.linalg.lstsq(design, data, rcond=None)
    grand_mean: FloatArray = np.asarray((sizes / n) @ coef[: names.size], dtype=np.float64)
    beta: FloatArray = np.asarray(coef[names.size :], dtype=np.float64)
    var_pooled: FloatArray = np.asarray(
        ((data - design @ coef) ** 2).mean(axis=0), dtype=np.float64
    )
    fitted = var_pooled > 0
    mod_mean = mod @ beta
    s = (data[:, fitted] - grand_mean[fitted] - mod_mean[:, fitted]) / np.sqrt(var_pooled[fitted])
    if int(fitted.sum()) < 2:
        raise StatsInputError(
            f"ComBat on {batch}: {int(fitted.sum())} feature(s) vary once the batches and "
            "preserved terms are fitted; its priors pool at least 2 features"
        )
    gamma = np.zeros((names.size, data.shape[1]))
    delta = np.ones((names.size, data.shape[1]))
    for k in range(names.size):
        block = s[codes == k]
        g_hat = block.mean(axis=0)
        d_hat = block.var(axis=0, ddof=1)
        d_hat[d_hat == 0] = 1.0
        a, b = _priors(d_hat)
        g_star, d_star = _posterior(
            block, g_hat, d_hat, float(g_hat.mean()), float(g_hat.var(ddof=1)), a, b
        )
        gamma[k, fitted], delta[k, fitted] = g_star, d_star
    model = ComBatModel(
        batch,
        tuple(str(b) for b in names),
        tuple(terms),
        grand_mean,
        var_pooled,
        beta,
        gamma,
        delta,
        fitted,
        n,
    )
    return model, model.apply(data, [str(b) for b in np.asarray(batches)], values)
