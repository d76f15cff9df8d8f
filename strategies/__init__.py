"""Aggregation strategies: one module each, all on the public base in ``strategies.base``."""
