"""Reference figures for the federated tables e2e test (tests/e2e/tables.rs).

Pools the four CPS 1988 offices' rows (/work/shared/data/cps1988/*.csv, or the folder given as
the first argument) and computes with pandas, on the train rows:
  - counts of ethnicity x smsa x parttime, every cell and every margin (pd.crosstab would drop
    empty cells; the full product of declared levels is listed instead, zeros included);
  - count, mean and sample variance (ddof=1) of wage by ethnicity x smsa, with margins.
Writes JSON to stdout: python3 tests/reference/table_reference.py > tests/data/table-reference.json
"""

import itertools
import json
import sys
from pathlib import Path

import pandas as pd

ALL = "(all)"
LEVELS = {
    "ethnicity": ["cauc", "afam"],
    "smsa": ["yes", "no"],
    "parttime": ["no", "yes"],
}


def keys(by):
    """Every cell and margin key: each column's levels, then ALL."""
    return itertools.product(*[LEVELS[c] + [ALL] for c in by])


def subset(df, by, key):
    mask = pd.Series(True, index=df.index)
    for col, level in zip(by, key):
        if level != ALL:
            mask &= df[col] == level
    return df[mask]


def main():
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/work/shared/data/cps1988")
    files = sorted(folder.glob("*.csv"))
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    train = df[df["split"] == "train"]

    by3 = ["ethnicity", "smsa", "parttime"]
    counts = [{"key": list(k), "count": int(len(subset(train, by3, k)))} for k in keys(by3)]

    by2 = ["ethnicity", "smsa"]
    wages = []
    for k in keys(by2):
        w = subset(train, by2, k)["wage"]
        wages.append(
            {
                "key": list(k),
                "count": int(w.count()),
                "sum": float(w.sum()),
                "mean": float(w.mean()),
                "var": float(w.var(ddof=1)),
            }
        )
    json.dump(
        {
            "source": "pooled CPS 1988 offices, train rows; pandas " + pd.__version__,
            "files": [f.name for f in files],
            "rows": int(len(train)),
            "counts_ethnicity_smsa_parttime": counts,
            "wage_by_ethnicity_smsa": wages,
        },
        sys.stdout,
        indent=1,
    )
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
