"""The privacy accountant: ε at δ after some rounds of the sampled Gaussian mechanism, from
Google's `dp-accounting` (RDP accountant), never computed by hand here.

Each round samples C·K of K clients and adds Gaussian noise of multiplier z to the clipped
sum: a Poisson-sampled Gaussian event with q = C·K/K, the approximation DP-FedAvg's authors
and TensorFlow Federated use for fixed-size sampling.
"""

from __future__ import annotations

import functools

from tinyfed.extras import require

# Integer orders: dp-accounting's default grid has fractional orders whose
# series it cannot sum for small q (it logs a warning per order and drops them).
ORDERS = (*range(2, 64), 80, 96, 128, 256, 512)


def _accounting():
    dpa = require("dp_accounting", "differential privacy (strategy dp-fedavg)")
    rdp = require("dp_accounting.rdp", "differential privacy (strategy dp-fedavg)")
    return dpa, rdp.RdpAccountant


@functools.lru_cache(maxsize=4096)
def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε(δ) after `rounds` rounds; 0 for no rounds, inf without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    dpa, RdpAccountant = _accounting()
    accountant = RdpAccountant(orders=ORDERS)
    event = dpa.PoissonSampledDpEvent(sample_rate, dpa.GaussianDpEvent(noise_multiplier))
    accountant.compose(event, rounds)
    return float(accountant.get_epsilon(delta))
