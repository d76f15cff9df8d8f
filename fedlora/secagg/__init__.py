"""Secure aggregation (SecAgg+): the protocol as pure functions and one node's state."""
