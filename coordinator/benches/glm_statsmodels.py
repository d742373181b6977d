"""statsmodels' side of the exact-logit benchmark (`coordinator/benches/glm.rs`): the same
logistic model (wage > 522.32 on education, experience, experience^2 and the ethnicity, smsa
and parttime dummies) on the pooled *train* rows of the four CPS 1988 offices.

    python glm_statsmodels.py REPS midwest.csv northeast.csv south.csv west.csv

Prints one JSON object: per repetition, the seconds of
- `fit_s`: `sm.Logit(y, X).fit(method="newton", tol=1e-8)` alone (design already built);
- `glm_fit_s`: `sm.GLM(y, X, Binomial()).fit()` (IRLS) alone;
- `read_and_fit_s`: reading the four CSVs, building the pooled design, and the Logit fit,
  which is what the federation's wall time also covers (nodes read their CSVs in the fit).
The interpreter's start and the imports are not timed.
"""

import json
import sys
import time

import numpy as np
import pandas as pd
import statsmodels
import statsmodels.api as sm


def design(paths):
    frames = [pd.read_csv(p) for p in paths]
    train = pd.concat(frames)
    train = train[train["split"] == "train"]
    exp = train["experience"].astype(float).to_numpy()
    x = np.column_stack(
        [
            np.ones(len(train)),
            train["education"].astype(float).to_numpy(),
            exp,
            exp**2,
            (train["ethnicity"] == "afam").to_numpy(dtype=float),
            (train["smsa"] == "yes").to_numpy(dtype=float),
            (train["parttime"] == "yes").to_numpy(dtype=float),
        ]
    )
    y = (train["wage"].astype(float).to_numpy() > 522.32).astype(float)
    return y, x


def logit(y, x):
    return sm.Logit(y, x).fit(method="newton", tol=1e-8, maxiter=100, disp=0)


def main():
    reps = int(sys.argv[1])
    paths = sys.argv[2:]
    y, x = design(paths)
    logit(y, x)  # warm-up: first-call costs of numpy, scipy and statsmodels
    fit_s, glm_s, read_s = [], [], []
    for _ in range(reps):
        t = time.perf_counter()
        res = logit(y, x)
        fit_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        sm.GLM(y, x, family=sm.families.Binomial()).fit()
        glm_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        yy, xx = design(paths)
        logit(yy, xx)
        read_s.append(time.perf_counter() - t)
    print(
        json.dumps(
            {
                "statsmodels": statsmodels.__version__,
                "pandas": pd.__version__,
                "numpy": np.__version__,
                "rows": int(len(y)),
                "columns": int(x.shape[1]),
                "iterations": int(res.mle_retvals["iterations"]),
                "converged": bool(res.mle_retvals["converged"]),
                "coef": res.params.tolist(),
                "fit_s": fit_s,
                "glm_fit_s": glm_s,
                "read_and_fit_s": read_s,
            }
        )
    )


if __name__ == "__main__":
    main()
