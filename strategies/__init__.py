"""Aggregation strategies: the public API, one module per built-in, the conformance kit."""
