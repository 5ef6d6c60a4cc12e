"""Privacy measurement (attackers, leakage report) and the learned anonymizers."""
