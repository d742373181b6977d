"""ε per office of the DP example experiments, with Google's dp-accounting (RDP accountant),
until fedstat's own accountant (`fedstat privacy epsilon`) is merged. In a throw-away venv:

    python3 -m venv /tmp/dpvenv && /tmp/dpvenv/bin/pip install dp-accounting
    /tmp/dpvenv/bin/python tests/reference/dp_examples_epsilon.py

Printed (dp-accounting 0.6.0): logit-dp ε = 0.7821, ols-dp ε = 0.9603, both at δ = 1e-5.
"""
import math
import tomllib
from pathlib import Path

from dp_accounting import dp_event, rdp

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def epsilon(q, sigma, steps, delta):
    acc = rdp.RdpAccountant()
    gauss = dp_event.GaussianDpEvent(sigma)
    acc.compose(gauss if q >= 1 else dp_event.PoissonSampledDpEvent(q, gauss), steps)
    return acc.get_epsilon(delta)


for name in ["experiment-logit-dp.toml", "experiment-ols-dp.toml"]:
    spec = tomllib.loads((CONFIGS / name).read_text())
    p = spec["privacy"]
    if spec.get("method", "fedavg") == "fedavg":
        q = p["sampling_rate"]
        steps = spec["rounds"] * math.ceil(spec["training"]["local_epochs"] / q)
    else:
        # The Gaussian mechanism: one release per round; the linear model ends in one.
        q, steps = 1.0, 1
    eps = epsilon(q, p["noise_multiplier"], steps, p.get("delta", 1e-5))
    print(f"{name}: q = {q}, sigma = {p['noise_multiplier']}, steps = {steps}: epsilon = {eps:.4f}")
