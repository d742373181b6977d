"""Reference values for fedstat's RDP accountant (`fedstat_core::accountant`): Google's
`dp-accounting` library, `RdpAccountant` with its default orders, composing
`SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)` (for q = 1 the
plain `GaussianDpEvent(sigma)`, which the library treats alike), then
`get_epsilon_and_optimal_order(delta)`.

Run in a throw-away venv (the product never needs Python):

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting
    /tmp/dpvenv/bin/python tests/reference/dp_accounting_reference.py \
        > tests/data/dp-accounting-reference.json

An RDP value of +inf (an order whose series did not converge, or sigma = 0) is written as null.
"""

import json
import math
import sys
from importlib import metadata

import dp_accounting
from dp_accounting import rdp

# (sampling rate q, noise multiplier sigma, steps, delta): q = 1 (the Gaussian mechanism on a
# sum, as exact GLMs and tables use it), small q as DP-SGD uses it, sigma from 0.5 to 10, steps
# from 1 to 10,000, several deltas.
GRID = [
    (1.0, 1.0, 1, 1e-5),
    (1.0, 0.5, 1, 1e-5),
    (1.0, 2.0, 10, 1e-6),
    (1.0, 5.0, 100, 1e-5),
    (1.0, 10.0, 1, 1e-7),
    (1.0, 10.0, 10000, 1e-5),
    (0.5, 1.0, 10, 1e-5),
    (0.5, 2.0, 100, 1e-6),
    (0.1, 0.5, 1, 1e-5),
    (0.1, 1.0, 100, 1e-5),
    (0.1, 1.1, 1000, 1e-6),
    (0.05, 0.8, 500, 1e-5),
    (0.02, 1.0, 2500, 1e-5),
    (0.01, 0.5, 10, 1e-5),
    (0.01, 1.0, 1, 1e-5),
    (0.01, 1.1, 10000, 1e-5),
    (0.01, 2.0, 1000, 1e-6),
    (0.01, 4.0, 10000, 1e-7),
    (0.004, 1.1, 10000, 1e-5),
    (0.004, 0.7, 300, 1e-3),
    (0.001, 0.5, 100, 1e-5),
    (0.001, 1.0, 10000, 1e-6),
    (0.001, 3.0, 10000, 1e-5),
    (0.001, 10.0, 1000, 1e-5),
    (0.2, 10.0, 1, 1e-5),
    (0.3, 5.0, 5000, 1e-8),
]


def finite_or_none(x):
    x = float(x)
    return x if math.isfinite(x) else None


def main():
    rows = []
    for q, sigma, steps, delta in GRID:
        accountant = rdp.RdpAccountant()
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        event = gaussian if q == 1.0 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
        epsilon, order = accountant.get_epsilon_and_optimal_order(delta)
        rows.append(
            {
                "sampling_rate": q,
                "noise_multiplier": sigma,
                "steps": steps,
                "delta": delta,
                "epsilon": finite_or_none(epsilon),
                "order": float(order),
                "rdp": [finite_or_none(r) for r in accountant._rdp],
            }
        )
    out = {
        "generator": "tests/reference/dp_accounting_reference.py",
        "dp_accounting_version": metadata.version("dp-accounting"),
        "orders": [float(o) for o in rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS],
        "configurations": rows,
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
