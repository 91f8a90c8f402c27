"""Adjusted between-cohort tests against independent references (issue 24).

References written here or taken from other packages, never from the code under
test: statsmodels' OLS type-II ANOVA for the Freedman-Lane rows; a
distance-matrix implementation of vegan's adonis2 (Gower-centred matrix, QR
fits) for the adjusted PERMANOVA, itself checked against vegan's printed
figures for the dune data; neuroCombat for ComBat.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from scipy.spatial.distance import pdist, squareform

from cohort import stats
from cohort.cli.main import main
from cohort.config import AdjustConfig, StatsConfig
from cohort.errors import StatsInputError
from cohort.execution.reduce import read_features
from cohort.stats.adjusted.combat import Term, combat_fit
from cohort.stats.adjusted.covariates import subject_table
from cohort.stats.adjusted.harmonise import feature_matrix, harmonise_features
from cohort.stats.adjusted.permute import permutation_blocks
from cohort.synthetic import synthetic_results

pytestmark = pytest.mark.timeout(300)

FAST = StatsConfig(bootstrap=50, permutations=49)
WORST: dict[str, float] = {}  # worst relative differences, printed for the notes


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three cohorts of 14 synthetic subjects with a subjects table (age, sex, site)."""
    return synthetic_results(
        tmp_path_factory.mktemp("adjusted") / "run",
        n_per_cohort=14,
        cohorts=("a", "b", "c"),
        images=False,
        cfg=StatsConfig(bootstrap=0, permutations=0),
        subjects_table=True,
        seed=7,
    )


def tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    features = read_features(folder / "features.parquet")
    similarity = pq.read_table(folder / "similarity.parquet").to_pandas()
    subjects = pd.read_csv(folder / "subjects.csv", dtype={"subject_id": str})
    return features, similarity, subjects


def table_of(subjects: pd.DataFrame, cfg: AdjustConfig, **kw: object):  # type: ignore[no-untyped-def]
    columns = {c: subjects[c].astype(str).tolist() for c in subjects.columns if c != "subject_id"}
    return subject_table(subjects["subject_id"].tolist(), columns, cfg, "subjects.csv", **kw)


@pytest.fixture(scope="module")
def adjusted(folder: Path) -> pd.DataFrame:
    features, similarity, subjects = tables(folder)
    table = table_of(subjects, AdjustConfig(covariates=("age", "sex")))
    return stats.run_tests(features, similarity, FAST, table)


# ------------------------------------------------------------------ statsmodels


def test_freedman_lane_rows_equal_statsmodels_type_ii_f(
    folder: Path, adjusted: pd.DataFrame
) -> None:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    _, similarity, subjects = tables(folder)
    rows = adjusted[adjusted.family == "between-pairs-adjusted"]
    assert len(rows) == 9 * 4  # 9 layer x pairs, 3 cohort pairs + all cohorts
    assert (rows.status == "ok").all() and (rows.adjusted_for == "age+sex").all()
    assert (rows.test == "freedman-lane").all()
    assert (rows.effect_name == "partial-eta-squared").all()
    worst = 0.0
    for row in rows.itertuples():
        a, b = row.pair.split("-")
        sel = similarity[
            (similarity.layer == row.layer)
            & (similarity.region_a == a)
            & (similarity.region_b == b)
            & similarity.cohort.isin(row.cohort.split("|"))
        ].merge(subjects, on="subject_id")
        fit = smf.ols("cosine ~ age + C(sex) + C(cohort)", data=sel).fit()
        anova = sm.stats.anova_lm(fit, typ=2)
        ss, resid = anova.loc["C(cohort)", "sum_sq"], anova.loc["Residual", "sum_sq"]
        assert row.n == len(sel)
        worst = max(worst, rel(row.statistic, anova.loc["C(cohort)", "F"]))
        worst = max(worst, rel(row.effect_size, ss / (ss + resid)))
        # a percentile CI of a statistic bounded at 0 need not hold the estimate
        assert 0 < row.p_value <= 1 and 0 <= row.ci_low <= row.ci_high <= 1
    WORST["statsmodels"] = worst
    print(f"worst relative difference against statsmodels: {worst:.2e}")
    assert worst <= 1e-9


def test_bootstrap_eta_squared_replays_statsmodels_on_the_documented_resamples() -> None:
    import statsmodels.api as sm
    import statsmodels.formula.api as smf

    from cohort.stats.adjusted.linear import partial_eta_squared_bootstrap
    from cohort.stats.adjusted.model import build_design

    rng = np.random.default_rng(3)
    n = 40
    frame = pd.DataFrame(
        {
            "subject_id": [f"s{i:02d}" for i in range(n)],
            "age": rng.uniform(20, 80, n).round(1),
            "sex": rng.choice(["F", "M"], n),
            "cohort": np.repeat(["a", "b"], n // 2),
        }
    )
    frame["y"] = 0.9 + 0.001 * frame.age + 0.01 * (frame.cohort == "b") + rng.normal(0, 0.02, n)
    table = table_of(frame[["subject_id", "age", "sex"]], AdjustConfig(covariates=("age", "sex")))
    codes = (frame.cohort == "b").to_numpy().astype(np.int64)
    design = build_design(table, table.rows(frame.subject_id), codes, ("a", "b"))
    draws = 30
    ours = partial_eta_squared_bootstrap(
        design, frame[["y"]].to_numpy(), codes, np.random.default_rng(11), draws
    )[:, 0]
    # the documented draws: group after group, rng.integers(0, n_g, size=(draws, n_g))
    replay = np.random.default_rng(11)
    members = [np.flatnonzero(codes == k) for k in (0, 1)]
    picks = [m[replay.integers(0, m.size, size=(draws, m.size))] for m in members]
    for b in range(draws):
        sample = frame.iloc[np.concatenate([p[b] for p in picks])]
        anova = sm.stats.anova_lm(smf.ols("y ~ age + C(sex) + C(cohort)", sample).fit(), typ=2)
        ss, resid = anova.loc["C(cohort)", "sum_sq"], anova.loc["Residual", "sum_sq"]
        assert ours[b] == pytest.approx(ss / (ss + resid), rel=1e-9)


def test_without_covariates_every_row_is_the_unadjusted_one(folder: Path) -> None:
    features, similarity, _ = tables(folder)
    plain = stats.run_tests(features, similarity, FAST)
    assert (plain.adjusted_for == "").all()
    assert not plain.family.str.endswith("adjusted").any()


# ---------------------------------------------------------- adonis2 by margin


def adonis2(
    dist: np.ndarray, terms: dict[str, np.ndarray], by: str
) -> dict[str, tuple[float, float, float]]:
    """vegan's adonis2 on a distance matrix: (SS, R², F) per term and of the residual.

    G = -1/2 C D² C (Gower), SS of a design = tr(Q' G Q) with Q from the QR of
    [1, columns]; ``by="terms"`` adds terms in order, ``by="margin"`` drops each
    from the full model.
    """
    n = dist.shape[0]
    centre = np.eye(n) - 1.0 / n
    gower = -0.5 * centre @ (dist**2) @ centre
    total = float(np.trace(gower))

    def fitted(names: list[str]) -> tuple[float, int]:
        design = np.column_stack([np.ones(n), *(terms[t] for t in names)])
        q, _ = np.linalg.qr(design)
        return float(np.trace(q.T @ gower @ q)), q.shape[1]

    names = list(terms)
    full, p = fitted(names)
    residual, df_res = total - full, n - p
    out: dict[str, tuple[float, float, float]] = {}
    for k, name in enumerate(names):
        if by == "margin":
            without, p_without = fitted([t for t in names if t != name])
            ss, df = full - without, p - p_without
        else:
            before, p_before = fitted(names[:k])
            upto, p_upto = fitted(names[: k + 1])
            ss, df = upto - before, p_upto - p_before
        out[name] = (ss, ss / total, (ss / df) / (residual / df_res))
    out["Residual"] = (residual, residual / total, float("nan"))
    out["Total"] = (total, 1.0, float("nan"))
    return out


# vegan's dune data (Jongman et al. 1987), as vegan ships it: 20 sites x 30 species
DUNE = """1 0 0 0 0 0 0 0 0 0 0 4 0 0 0 0 7 0 4 2 0 0 0 0 0 0 0 0 0 0
3 0 0 2 0 3 4 0 0 0 0 4 0 0 0 0 5 0 4 7 0 0 0 0 5 0 5 0 0 0
0 4 0 7 0 2 0 0 0 0 0 4 0 0 0 0 6 0 5 6 0 0 0 0 2 0 2 0 2 0
0 8 0 2 0 2 3 0 2 0 0 4 0 0 0 0 5 0 4 5 0 0 5 0 2 0 1 0 2 0
2 0 0 0 4 2 2 0 0 0 0 4 0 0 0 0 2 5 2 6 0 5 0 0 3 2 2 0 2 0
2 0 0 0 3 0 0 0 0 0 0 0 0 0 0 0 6 5 3 4 0 6 0 0 3 5 5 0 6 0
2 0 0 0 2 0 2 0 0 0 0 0 0 0 0 2 6 5 4 5 0 3 0 0 3 2 2 0 2 0
0 4 0 5 0 0 0 0 0 0 4 0 0 0 4 0 4 0 4 4 2 0 2 0 3 0 2 0 2 0
0 3 0 3 0 0 0 0 0 0 0 6 0 0 4 4 2 0 4 5 0 2 2 0 2 0 3 0 2 0
4 0 0 0 4 2 4 0 0 0 0 0 0 0 0 0 6 3 4 4 0 0 0 0 3 0 6 1 2 0
0 0 0 0 0 0 0 0 0 0 0 0 0 2 0 0 7 3 4 0 0 0 2 0 5 0 3 2 4 0
0 4 0 8 0 0 0 0 0 0 0 0 0 0 0 4 0 0 0 4 0 2 4 0 2 0 3 0 4 0
0 5 0 5 0 0 0 1 0 0 0 0 0 0 0 3 0 0 2 9 2 0 2 0 2 0 2 0 0 0
0 4 0 0 0 0 0 0 0 2 4 0 0 0 0 0 0 0 0 0 2 0 0 0 2 0 6 0 0 4
0 4 0 0 0 0 0 0 0 2 5 0 0 0 3 0 0 0 0 0 2 0 0 0 2 0 1 0 4 0
0 7 0 4 0 0 0 0 0 0 8 0 0 0 3 0 0 0 0 2 2 0 0 0 0 0 0 0 4 3
2 0 2 0 4 0 0 0 0 0 0 0 0 2 0 0 0 2 1 0 0 0 0 0 2 0 0 0 0 0
0 0 0 0 0 2 0 0 0 0 0 0 0 0 0 0 2 3 3 0 0 0 0 3 5 0 2 1 6 0
0 0 3 0 4 0 0 0 0 0 0 0 2 5 0 0 0 0 0 0 0 0 3 3 6 0 2 0 3 0
0 5 0 0 0 0 0 0 0 0 4 0 0 0 4 0 0 0 0 0 4 0 0 5 2 0 0 0 4 3"""
DUNE_A1 = [2.8, 3.5, 4.3, 4.2, 6.3, 4.3, 2.8, 4.2, 3.7, 3.3,
           3.5, 5.8, 6.0, 9.3, 11.5, 5.7, 4.0, 4.6, 3.7, 3.5]  # fmt: skip
DUNE_MANAGEMENT = "SF BF SF SF HF HF HF HF HF BF BF SF SF NM NM SF NM NM NM NM".split()  # noqa: SIM905


def test_the_adonis2_reference_reproduces_vegans_printed_dune_figures() -> None:
    """vegan 2.6-4, ``adonis2(dune ~ Management*A1, data = dune.env)`` (Bray-Curtis,
    by terms), as printed in its help example: Management 1.4686 (R² 0.34161, F
    3.2629), A1 0.4409 (0.10256, 2.9387), Management:A1 0.5892 (0.13705, 1.3090),
    Residual 1.8004 (0.41878), Total 4.2990. A1's sum of squares after Management is
    also its marginal one in ``dune ~ Management + A1`` (by = "margin"), which must
    match the same printed 0.4409 and 0.10256."""
    dune = np.array([[float(v) for v in line.split()] for line in DUNE.splitlines()])
    dist = squareform(pdist(dune, "braycurtis"))
    a1 = np.array(DUNE_A1)
    levels = sorted(set(DUNE_MANAGEMENT))  # treatment contrasts, BF the reference
    dummies = np.column_stack([[m == lv for m in DUNE_MANAGEMENT] for lv in levels[1:]])
    management = dummies.astype(float)
    terms = {"Management": management, "A1": a1, "Management:A1": management * a1[:, None]}
    seq = adonis2(dist, terms, "terms")
    printed = {
        "Management": (1.4686, 0.34161, 3.2629),
        "A1": (0.4409, 0.10256, 2.9387),
        "Management:A1": (0.5892, 0.13705, 1.3090),
        "Residual": (1.8004, 0.41878, float("nan")),
        "Total": (4.2990, 1.0, float("nan")),
    }
    for name, values in printed.items():
        for got, want in zip(seq[name], values, strict=True):
            if np.isfinite(want):  # printed to 4-5 significant digits
                assert abs(got - want) <= 0.6 * 10 ** np.floor(np.log10(abs(want)) - 3), name
    margin = adonis2(dist, {"Management": management, "A1": a1}, "margin")
    assert margin["A1"][0] == pytest.approx(0.4409, abs=6e-5)
    assert margin["A1"][1] == pytest.approx(0.10256, abs=6e-6)
    # the additive model's residual: Total - Management - A1 (sequential)
    assert margin["Residual"][0] == pytest.approx(4.2990 - 1.4686 - 0.4409, abs=2e-4)


def test_adjusted_permanova_equals_the_adonis2_reference(
    folder: Path, adjusted: pd.DataFrame
) -> None:
    features, _, subjects = tables(folder)
    rows = adjusted[adjusted.family == "between-features-adjusted"]
    assert len(rows) == 9 * 4 and (rows.status == "ok").all()
    assert (rows.test == "permanova").all() and (rows.effect_name == "r-squared").all()
    info = subjects.set_index("subject_id")
    worst = 0.0
    for row in rows.itertuples():
        cohorts = row.cohort.split("|")
        sel = features[
            (features.layer == row.layer)
            & (features.region == row.pair)
            & features.cohort.isin(cohorts)
        ].sort_values("subject_id")
        vectors = np.stack([np.asarray(v, dtype=np.float64) for v in sel.vector])
        dist = np.sqrt(stats.cosine_distances(vectors))  # adonis2 squares it: D² = 1 - cos
        meta = info.loc[sel.subject_id.astype(str)]
        cohort = sel.cohort.to_numpy()
        terms = {
            "age": meta.age.to_numpy(dtype=float),
            "sex": (meta.sex.to_numpy() == "M").astype(float),
            "cohort": np.column_stack([cohort == c for c in cohorts[1:]]).astype(float),
        }
        _, r2, f = adonis2(dist, terms, "margin")["cohort"]
        worst = max(worst, rel(row.statistic, f), rel(row.effect_size, r2))
    WORST["adonis2"] = worst
    print(f"worst relative difference against the adonis2 reference: {worst:.2e}")
    assert worst <= 1e-9


# ------------------------------------------------------------------ neuroCombat


def test_combat_equals_neurocombat_on_the_pooled_matrix(folder: Path) -> None:
    from neuroCombat import neuroCombat

    features, _, subjects = tables(folder)
    pooled = feature_matrix(features)
    info = subjects.set_index("subject_id").loc[pooled.ids.astype(str)]
    ages = np.round(info.age.to_numpy())  # neuroCombat reads continuous columns as float32
    values = {"cohort": list(pooled.cohorts), "sex": list(info.sex), "age": list(ages)}
    terms = [
        Term("cohort", "categorical", ("a", "b", "c")),
        Term("sex", "categorical", ("F", "M")),
        Term("age", "continuous"),
    ]
    sites = list(info.site)
    # a strong site effect on top of the synthetic vectors
    rng = np.random.default_rng(5)
    shift = {s: rng.normal(0, 0.5, pooled.matrix.shape[1]) for s in ("A", "B", "C")}
    scale = {"A": 1.0, "B": 1.6, "C": 0.7}
    data = np.stack(
        [row * scale[s] + shift[s] for row, s in zip(pooled.matrix, sites, strict=True)]
    )
    model, ours = combat_fit(data, sites, terms, values, "site")
    covars = pd.DataFrame({"site": sites, "cohort": values["cohort"], "sex": values["sex"]})
    covars["age"] = ages
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = neuroCombat(
            data.T.copy(),
            covars,
            "site",
            categorical_cols=["cohort", "sex"],
            continuous_cols=["age"],
        )["data"].T
    worst = float((np.abs(ours - theirs) / np.abs(theirs)).max())
    WORST["neuroCombat"] = worst
    print(f"worst relative difference against neuroCombat: {worst:.2e}")
    assert worst <= 1e-6
    # applying the fitted model to the same subjects reproduces the harmonised data
    assert np.array_equal(model.apply(data, sites, values), ours)


def test_harmonised_table_holds_the_harmonised_vectors(folder: Path) -> None:
    features, _, subjects = tables(folder)
    table = table_of(subjects, AdjustConfig(covariates=("age",), harmonise="site"))
    result = harmonise_features(features, table, "site")
    assert list(result.features.columns) == list(features.columns)
    assert len(result.features) == len(features)
    again = feature_matrix(result.features)
    pooled = feature_matrix(features)
    assert not np.allclose(again.matrix, pooled.matrix)
    summary = result.summary
    assert summary["subjects"] == pooled.ids.size and summary["left_out"]["count"] == 0
    assert summary["batch_share_after"] < summary["batch_share_before"]


def test_a_site_of_one_subject_is_an_error_naming_it(folder: Path) -> None:
    features, _, subjects = tables(folder)
    subjects = subjects.copy()
    subjects.loc[0, "site"] = "lonely"
    table = table_of(subjects, AdjustConfig(harmonise="site"))
    with pytest.raises(StatsInputError, match=r"fewer than 2 subjects: lonely \(1 subject\)"):
        harmonise_features(features, table, "site")


# ------------------------------------------------------------------ strata


def test_no_permutation_ever_mixes_two_strata() -> None:
    rng = np.random.default_rng(0)
    strata = rng.integers(0, 4, 3000)
    seen = 0
    moved = np.zeros(3000, dtype=bool)
    for block in permutation_blocks(3000, 500, np.random.default_rng(1), strata):
        assert (strata[block] == strata).all()  # every subject stays in its stratum
        assert (np.sort(block, axis=1) == np.arange(3000)).all()  # a permutation
        moved |= (block != np.arange(3000)).any(axis=0)
        seen += block.shape[0]
    assert seen == 500 and moved.all()  # and it does shuffle within the strata


def test_stratified_rows_say_so_and_one_cohort_per_stratum_is_not_tested(folder: Path) -> None:
    features, similarity, subjects = tables(folder)
    table = table_of(subjects, AdjustConfig(covariates=("age",), strata="site"))
    rows = stats.run_tests(features, similarity, FAST, table)
    permuted = rows[(rows.test == "permanova") | (rows.test == "freedman-lane")]
    assert permuted.reason.str.contains(
        "permutations within strata of site (3 levels)", regex=False
    ).all()
    by_cohort = subjects.assign(site=subjects.subject_id.str[0])  # stratum = cohort
    table = table_of(by_cohort, AdjustConfig(covariates=("age",), strata="site"))
    rows = stats.run_tests(features, similarity, FAST, table)
    permuted = rows[(rows.test == "permanova") | (rows.test == "freedman-lane")]
    assert (permuted.status == "skipped").all()
    assert permuted.reason.str.contains("every stratum holds one cohort").all()


# ------------------------------------------------------------------ edge cases


def test_missing_unknown_and_constant_covariates_are_clear_errors(folder: Path) -> None:
    _, _, subjects = tables(folder)
    holes = subjects.astype({"age": object})
    holes.loc[[1, 4], "age"] = ""
    with pytest.raises(StatsInputError, match=r"2 subject\(s\) have no value of 'age'.*a-002"):
        table_of(holes, AdjustConfig(covariates=("age",)))
    with pytest.raises(StatsInputError, match=r"'weight'.*not in subjects.csv.*subject_id"):
        table_of(subjects, AdjustConfig(covariates=("weight",)))
    flat = subjects.assign(scanner="X")
    with pytest.raises(StatsInputError, match=r"covariate 'scanner' has one value \(X\)"):
        table_of(flat, AdjustConfig(covariates=("scanner",)))


def test_drop_incomplete_counts_the_subjects_in_each_row(folder: Path) -> None:
    features, similarity, subjects = tables(folder)
    holes = subjects.astype({"age": object})
    holes.loc[[1, 4], "age"] = "NA"
    table = table_of(holes, AdjustConfig(covariates=("age",), drop_incomplete=True))
    rows = stats.run_tests(features, similarity, FAST, table)
    ab = rows[rows.family.str.endswith("adjusted") & (rows.cohort == "a|b")]
    assert ab.reason.str.contains(
        "dropped 2 subject(s) with a missing covariate", regex=False
    ).all()
    assert (ab.n == 26).all() and (ab.status == "ok").all()


def test_a_covariate_that_separates_the_cohorts_is_not_tested_and_says_why(
    folder: Path,
) -> None:
    features, similarity, subjects = tables(folder)
    cohort = subjects.subject_id.str[0]
    split = subjects.assign(age=np.where(cohort == "a", 30.0, 70.0) + np.arange(len(cohort)) % 7)
    table = table_of(split, AdjustConfig(covariates=("age",)))
    rows = stats.run_tests(features, similarity, FAST, table)
    adj = rows[rows.family.str.endswith("adjusted")]
    with_a = adj[adj.cohort.str.contains("a")]
    assert (with_a.status == "skipped").all()
    assert with_a.reason.str.contains("do not overlap in age").all()
    assert (adj[adj.cohort == "b|c"].status == "ok").all()  # b and c overlap
    nested = subjects.assign(group=np.where(cohort == "a", "x", "y"))
    table = table_of(nested, AdjustConfig(covariates=("group",)))
    rows = stats.run_tests(features, similarity, FAST, table)
    ab = rows[rows.family.str.endswith("adjusted") & (rows.cohort == "a|b")]
    assert (ab.status == "skipped").all() and ab.reason.str.contains("collinear").all()
    bc = rows[rows.family.str.endswith("adjusted") & (rows.cohort == "b|c")]
    assert bc.reason.str.contains("left out of the model, the same for every subject").all()
    for frame in (adj, rows):
        assert frame.loc[frame.status == "ok", "p_value"].notna().all()
        assert (frame.loc[frame.status == "skipped", "reason"].str.len() > 0).all()


# ------------------------------------------------------------------ command line


def test_stats_command_adjusts_records_and_switches_back(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    before = (run / "stats.csv").read_bytes()
    table = str(run / "subjects.csv")
    args = ["stats", str(run), "--covariates", "age,sex", "--subjects-table", table]
    result = CliRunner().invoke(main, [*args, "--permutations", "19", "--bootstrap", "20"])
    assert result.exit_code == 0, result.output
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["adjust"]["covariates"] == ["age", "sex"]
    kinds = {c["name"]: c for c in record["covariates"]["covariates"]}
    assert kinds["age"] == {"name": "age", "type": "continuous"}
    assert kinds["sex"] == {"name": "sex", "type": "categorical", "levels": ["F", "M"],
                            "reference": "F"}  # fmt: skip
    tests = pd.read_parquet(run / "stats.parquet")
    assert set(tests.adjusted_for) == {"", "age+sex"}
    adjusted = (run / "stats.csv").read_bytes()
    assert CliRunner().invoke(main, ["stats", str(run)]).exit_code == 0  # keeps the settings
    assert (run / "stats.csv").read_bytes() == adjusted
    off = ["stats", str(run), "--covariates", "", "--permutations", "0", "--bootstrap", "0"]
    assert CliRunner().invoke(main, off).exit_code == 0
    assert (run / "stats.csv").read_bytes() == before
    assert not (run / "covariates.parquet").exists()


def test_stats_command_refuses_an_unknown_column_with_exit_2(folder: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    table = str(run / "subjects.csv")
    result = CliRunner().invoke(
        main, ["stats", str(run), "--covariates", "agee", "--subjects-table", table]
    )
    assert result.exit_code == 2
    assert "'agee'" in result.output and "subjects.csv" in result.output


def test_harmonise_with_applies_the_saved_model_without_refitting(
    folder: Path, tmp_path: Path
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(folder, old)
    table = str(old / "subjects.csv")
    fast = ["--permutations", "9", "--bootstrap", "0"]
    args = ["stats", str(old), "--covariates", "age", "--subjects-table", table]
    result = CliRunner().invoke(main, [*args, "--harmonise", "site", *fast])
    assert result.exit_code == 0, result.output
    for name in ("features_harmonised.parquet", "harmonisation.parquet"):
        assert (old / name).is_file()
    similarity = pd.read_parquet(old / "similarity.parquet")
    assert similarity.cosine_harmonised.notna().all()
    assert "harmonised" in (old / "similarity.csv").read_text().splitlines()[1]
    # a new run (here: the same subjects) harmonised with the old model, not refitted
    shutil.copytree(folder, new)
    args = ["stats", str(new), "--covariates", "age", "--subjects-table", table]
    result = CliRunner().invoke(main, [*args, "--harmonise-with", str(old), *fast])
    assert result.exit_code == 0, result.output
    mine = pq.read_table(new / "features_harmonised.parquet").column("vector")
    theirs = pq.read_table(old / "features_harmonised.parquet").column("vector")
    assert mine.equals(theirs)
    record = json.loads((new / "run.json").read_text())
    assert record["harmonisation"]["model"] == "applied without refitting"
    assert record["harmonisation"]["applied_from"] == str(old)
    # a site the model does not know is refused, naming it
    subjects = pd.read_csv(table).assign(site=lambda f: f.site.replace("C", "D"))
    subjects.to_csv(tmp_path / "moved.csv", index=False)
    args = ["stats", str(new), "--subjects-table", str(tmp_path / "moved.csv")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "batch(es) D are not in the fitted model" in result.output


def test_report_shows_the_adjusted_and_site_effect_sections(folder: Path, tmp_path: Path) -> None:
    from cohort.report import write_report

    run = tmp_path / "run"
    shutil.copytree(folder, run)
    table = str(run / "subjects.csv")
    args = ["stats", str(run), "--covariates", "age,sex", "--subjects-table", table]
    result = CliRunner().invoke(main, [*args, "--harmonise", "site", "--permutations", "9"])
    assert result.exit_code == 0, result.output
    page = write_report(run).read_text()
    assert 'id="adjusted"' in page and 'id="harmonisation"' in page
    assert "reference F" in page and "freedman-lane" in page
    for name in ("site_effect", "covariate_age_conv-1"):
        assert (run / "report" / f"{name}.png").is_file()
