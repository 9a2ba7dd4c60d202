"""What a rule reads: one context type per kind of evidence (the rule's stage says which).

* `GraphContext`   -- the graph of a model and how it was built (meta, graph, params rules)
* `DataContext`    -- a sample of the data, measured against the model (data rules)
* `RuntimeContext` -- a measured training run, the probe's or the user's own (runtime rules)
* `LoopContext`    -- the facts only the watcher sees inside the user's loop (loop rules)

`draft` marks a live judgement inside the user's training (the watcher's announcement): rules
may then skip building patches, which read and parse the user's files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from netdoctor.rules.stage import Stage

if TYPE_CHECKING:
    from netdoctor.data.sample import DataSample
    from netdoctor.graph.build import BuildOutcome
    from netdoctor.graph.ir import Graph
    from netdoctor.measure.facts import LoopFacts
    from netdoctor.measure.record import TrainingRun


@dataclass
class GraphContext:
    target: str
    outcome: BuildOutcome
    draft: bool = False

    stages = (Stage.META, Stage.GRAPH, Stage.PARAMS)

    @property
    def graph(self) -> Graph:
        """The graph (graph and params rules run only when one was built)."""
        graph = self.outcome.graph
        assert graph is not None, "graph rules run only on a built graph"
        return graph

    def runs(self, stage: Stage) -> bool:
        return stage is Stage.META or (stage in self.stages and self.outcome.graph is not None)


@dataclass
class DataContext:
    target: str
    data: DataSample
    draft: bool = False

    def runs(self, stage: Stage) -> bool:
        return stage is Stage.DATA


@dataclass
class RuntimeContext:
    target: str
    run: TrainingRun
    draft: bool = False

    def runs(self, stage: Stage) -> bool:
        return stage is Stage.RUNTIME


@dataclass
class LoopContext:
    target: str
    loop: LoopFacts
    draft: bool = False

    def runs(self, stage: Stage) -> bool:
        return stage is Stage.LOOP


RuleContext = GraphContext | DataContext | RuntimeContext | LoopContext
