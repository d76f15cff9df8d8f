"""Differential privacy: client DP-SGD with Opacus, and the accounting of central DP."""
