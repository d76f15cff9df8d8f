"""What a run's data is: the dataset, its columns, how it is split over clients.

The part of the run configuration the data functions read (``RunConfig.data``), so that
they take a small value instead of the whole configuration.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DataSpec:
    """The dataset and its split; field meanings as the run-config keys of the same name."""

    dataset: str = "20newsgroups"
    task: str = "sequence-classification"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    response_column: str = "response"
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    partition_column: str = ""
    seed: int = 0
    validation_fraction: float = 0.0
