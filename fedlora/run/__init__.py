"""Running fedlora: the command line, Flower processes, preflight checks, results, checkpoints."""
