"""Privacy accounting through Opacus' accountants (RDP and PRV), and the inverse: the
noise multiplier that spends a target ε in a given number of steps.

MaskDP's step is the same subsampled Gaussian mechanism as DP-SGD's (sensitivity C,
noise σC, Poisson rate q), so the same accountants apply unchanged.
"""

from __future__ import annotations

from typing import Literal

Accountant = Literal["rdp", "prv"]


def default_delta(num_videos: int) -> float:
    """δ = min(1e-5, 1 / N^1.1): smaller than 1/N, so it cannot cover leaking a whole video."""
    return min(1e-5, 1.0 / float(num_videos) ** 1.1)


def make_accountant(kind: Accountant):  # -> opacus.accountants.IAccountant
    from opacus.accountants import PRVAccountant, RDPAccountant

    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ValueError(f"accountant {kind!r}: expected rdp or prv")


def epsilon_spent(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                  kind: Accountant = "rdp") -> float:
    """ε after `steps` Poisson-subsampled Gaussian steps."""
    if steps <= 0:
        return 0.0
    acc = make_accountant(kind)
    # One history entry with `steps` repetitions: what Opacus records for a constant σ, q.
    acc.history = [(noise_multiplier, sample_rate, steps)]
    if kind == "prv":  # PRV's default error bound (0.01 absolute) is loose at small ε
        return float(acc.get_epsilon(delta=delta, eps_error=1e-3))
    return float(acc.get_epsilon(delta=delta))


def noise_for_epsilon(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                      kind: Accountant = "rdp", tolerance: float = 0.01) -> float:
    """The smallest noise multiplier whose ε after `steps` is at most `target_epsilon`
    (as Opacus' make_private_with_epsilon)."""
    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0:
        raise ValueError(f"target ε must be positive, got {target_epsilon}")
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                      sample_rate=sample_rate, steps=steps, accountant=kind,
                                      epsilon_tolerance=tolerance))
