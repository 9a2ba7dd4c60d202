"""A rule's stage: when it can judge, and so which context it reads (`netdoctor.rules.contexts`)."""

from __future__ import annotations

from enum import Enum


class Stage(str, Enum):
    """When a rule can judge, and so which context it reads (`netdoctor.rules.contexts`)."""

    META = "meta"  # how the graph was built (ND0xx): GraphContext, also without a graph
    GRAPH = "graph"  # the model's structure (ND1xx): GraphContext
    PARAMS = "params"  # parameters and signal at init (ND2xx): GraphContext
    DATA = "data"  # a sample of the data (ND3xx): DataContext
    RUNTIME = "runtime"  # a measured training run (ND4xx): RuntimeContext
    LOOP = "loop"  # the user's own training loop (ND5xx): LoopContext

    def __str__(self) -> str:
        return self.value
