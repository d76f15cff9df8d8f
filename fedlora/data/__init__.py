"""Datasets, partitions and prompts: the text a node trains and evaluates on."""
