"""Pooled reference fits for the exact federated GLMs (issue 10) that `reference.json` of the
shared data does not cover: Poisson (log link) and Gamma (log link), with and without region
(office) effects, on the pooled *train* rows of CPS 1988.

Run in a throw-away venv (the product never needs Python):

    python3 -m venv /tmp/refvenv && /tmp/refvenv/bin/pip install statsmodels pandas
    /tmp/refvenv/bin/python tests/reference/glm_reference.py ../shared/data/cps1988 \
        > tests/data/glm-reference.json

Design columns follow the data README: const, numeric columns as they are, one-hot dummies with
the reference level dropped; `region=*` dummies (reference northeast) for office effects.
Fits use statsmodels' IRLS to convergence (tol 1e-10, the relative deviance change the issue asks for); standard errors are the model-based ones
(`bse`), with the Pearson chi^2 / df_resid dispersion for Gamma, as R's summary.glm reports.
"""

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import statsmodels
import statsmodels.api as sm

REGIONS = ["midwest", "south", "west"]  # reference level: northeast


def design(df, numeric, squared, offices):
    cols = {"const": np.ones(len(df))}
    for c in numeric:
        cols[c] = df[c].astype(float).to_numpy()
        if c in squared:
            cols[f"{c}^2"] = cols[c] ** 2
    cols["ethnicity=afam"] = (df["ethnicity"] == "afam").astype(float).to_numpy()
    cols["smsa=yes"] = (df["smsa"] == "yes").astype(float).to_numpy()
    cols["parttime=yes"] = (df["parttime"] == "yes").astype(float).to_numpy()
    if offices:
        for r in REGIONS:
            cols[f"region={r}"] = (df["region"] == r).astype(float).to_numpy()
    return pd.DataFrame(cols)


def fit(df, target, family, numeric, squared, offices, offset=None, weights=None):
    if weights is not None:
        # R's prior weights: rows of weight 0 take no part (not even in the degrees of freedom).
        df = df[df[weights] > 0]
    x = design(df, numeric, squared, offices)
    y = df[target].astype(float).to_numpy()
    kwargs = {}
    if offset is not None:
        kwargs["offset"] = np.log(df[offset].astype(float).to_numpy())
    if weights is not None:
        kwargs["var_weights"] = df[weights].astype(float).to_numpy()
    res = sm.GLM(y, x, family=family, **kwargs).fit(method="IRLS", tol=1e-10, maxiter=100)
    return {
        "target": target,
        "family": family.__class__.__name__.lower(),
        "link": "log",
        "columns": list(x.columns),
        "coefficients": res.params.tolist(),
        "std_errors": res.bse.tolist(),
        "z_or_t_values": res.tvalues.tolist(),
        "p_values": res.pvalues.tolist(),
        "deviance": float(res.deviance),
        "null_deviance": float(res.null_deviance),
        "aic": float(res.aic),
        "dispersion": float(res.scale),
        "df_residual": int(res.df_resid),
        "iterations": int(res.fit_history["iteration"]),
        "converged": bool(res.converged),
        "n": int(res.nobs),
    }


def main():
    folder = Path(sys.argv[1])
    frames = [pd.read_csv(folder / f"{r}.csv") for r in ["midwest", "northeast", "south", "west"]]
    train = pd.concat(frames).sort_values("id")
    train = train[train["split"] == "train"]
    out = {
        "source": f"pooled train rows of CPS 1988 ({len(train)} rows), statsmodels "
        f"{statsmodels.__version__} GLM IRLS, tol 1e-10; made by tests/reference/glm_reference.py",
        "models": {
            # Years of education as a count, from experience and the dummies.
            "poisson_education": fit(
                train, "education", sm.families.Poisson(), ["experience"], ["experience"], False
            ),
            "poisson_education_offices": fit(
                train, "education", sm.families.Poisson(), ["experience"], ["experience"], True
            ),
            # A rate: education per log-dollar of wage (offset log(wage)), to test offsets.
            "poisson_education_offset_log_wage": fit(
                train, "education", sm.families.Poisson(), ["experience"], ["experience"], False,
                offset="wage",
            ),
            # Prior weights (years of education; rows with 0 years drop out, as in R).
            "gaussian_log_wage_weighted": fit(
                train.assign(log_wage=np.log(train["wage"])), "log_wage", sm.families.Gaussian(),
                ["experience"], ["experience"], False, weights="education",
            ),
            # Weekly wage, positive and right-skewed: Gamma with log link.
            "gamma_wage": fit(
                train,
                "wage",
                sm.families.Gamma(link=sm.families.links.Log()),
                ["education", "experience"],
                ["experience"],
                False,
            ),
        },
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
