"""The graph IR: a dataflow graph of normalized ops with parameter summaries and source locations.

It is torch-free so that every frontend (torch.fx, the hook fallback, ONNX) can produce it and
every static rule can read it without caring where it came from.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netdoctor.findings import Location

# Normalized op kinds. Frontends map their own op names onto these (see netdoctor.graph.ops).
WEIGHT_OPS = {"conv", "linear"}
NORM_OPS = {"batchnorm", "layernorm", "groupnorm", "instancenorm", "rmsnorm"}
SATURATING_OPS = {"sigmoid", "tanh"}
RELU_FAMILY = {"relu", "relu6", "leaky_relu", "elu", "selu", "celu", "prelu", "rrelu"}
MERGE_OPS = {"add", "cat", "sub"}
TERMINAL_OPS = {"input", "output", "param"}


@dataclass
class ParamInfo:
    """A summary of one parameter tensor (enough for init rules without holding the tensor)."""

    shape: tuple[int, ...]
    numel: int
    mean: float
    std: float
    all_equal: bool
    trainable: bool = True


@dataclass
class Node:
    name: str  # unique within the graph
    op: str  # normalized op kind, e.g. "conv", "relu", "add", "output"
    target: str  # the frontend's own name: "torch.nn.Conv2d", "torch.relu", "Conv"
    module: str | None = None  # qualified module path ("features.0") for module calls
    inputs: list[str] = field(default_factory=list)  # producer node names, in argument order
    params: dict[str, ParamInfo] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    shape: tuple[int, ...] | None = None  # output shape (with batch dim) when known
    location: Location | None = None

    @property
    def label(self) -> str:
        """How findings name this node: its module path, else its op name."""
        return self.module or self.name


@dataclass
class ModuleInfo:
    """A registered submodule: its type, trainable parameter count and construction site."""

    path: str
    type: str
    trainable: int
    location: Location | None = None
    is_leaf: bool = True
    # One of its own parameters is also another module's (tied weights: a block shared by
    # several layers through the same Parameter, an embedding tied to the output layer).
    shares_parameters: bool = False


@dataclass
class UnregisteredHolder:
    """Modules kept in a plain list/dict/tuple attribute (invisible to .parameters())."""

    owner: str  # module path of the object holding the attribute ("" for the root)
    attr: str
    container: str  # "list", "dict", "tuple"
    count: int
    module_types: list[str]
    location: Location | None = None  # where the first held module was constructed
    owner_class: str | None = None
    owner_location: Location | None = None  # the owner class definition
    # What hiding them loses (None: not measured, judged as if everything were lost): the
    # parameter and buffer tensors inside the held modules, and the types among them whose
    # behaviour depends on train/eval (they override `train` or read `self.training`).
    parameters: int | None = None
    buffers: int | None = None
    mode_dependent: list[str] | None = None

    @property
    def stateless(self) -> bool:
        """Only stateless, mode-free modules (activations, kernels): nothing is lost."""
        return self.parameters == 0 and self.buffers == 0 and self.mode_dependent == []


@dataclass
class Graph:
    nodes: dict[str, Node] = field(default_factory=dict)
    frontend: str = "fx"  # "fx", "hooks", "onnx"
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    unregistered: list[UnregisteredHolder] = field(default_factory=list)
    input_shape: tuple[int, ...] | None = None
    root_location: Location | None = None  # the model class definition
    notes: list[str] = field(default_factory=list)
    # Parameters held under several names (tied weights): each group's qualified names, in
    # registration order ("tok.weight", "head.weight": an embedding tied to the output layer).
    tied: list[tuple[str, ...]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._succ: dict[str, list[str]] | None = None  # successors by name, built on first use

    # -- construction -----------------------------------------------------------------
    def add(self, node: Node) -> Node:
        if node.name in self.nodes:
            raise ValueError(f"duplicate node name {node.name!r}")
        self.nodes[node.name] = node
        self._succ = None
        return node

    def fresh_name(self, base: str) -> str:
        """`base`, or `base_1`, `base_2`, ... when a node already has that name (a module
        registered as `output` is recorded under its path)."""
        name, n = base, 0
        while name in self.nodes:
            n += 1
            name = f"{base}_{n}"
        return name

    # -- queries ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def of_op(self, *ops: str) -> list[Node]:
        return [n for n in self if n.op in ops]

    @property
    def outputs(self) -> list[Node]:
        return [n for n in self if n.op == "output"]

    def successors(self, name: str) -> list[Node]:
        succ = self._succ
        if succ is None:
            succ = {n: [] for n in self.nodes}
            for n in self:
                for i in n.inputs:
                    if i in succ:
                        succ[i].append(n.name)
            self._succ = succ
        return [self.nodes[s] for s in succ[name]]

    def aliases(self, parameter: str) -> tuple[str, ...]:
        """Every qualified name of the parameter called `parameter` (itself alone when untied)."""
        return next((group for group in self.tied if parameter in group), (parameter,))

    def predecessors(self, name: str) -> list[Node]:
        return [self.nodes[i] for i in self.nodes[name].inputs if i in self.nodes]

    def topological(self) -> list[Node]:
        """Nodes with every producer before its consumers (frontends add them in that order,
        but ONNX files need not be sorted)."""
        indeg = {n.name: sum(1 for i in n.inputs if i in self.nodes) for n in self}
        queue = deque(n for n, d in indeg.items() if d == 0)
        order: list[Node] = []
        while queue:
            name = queue.popleft()
            order.append(self.nodes[name])
            for s in self.successors(name):
                indeg[s.name] -= 1
                if indeg[s.name] == 0:
                    queue.append(s.name)
        if len(order) < len(self.nodes):  # a cycle: fall back to insertion order
            return list(self)
        return order

    def reaching_output(self) -> set[str]:
        """Names of the nodes whose value can reach a model output."""
        seen: set[str] = set()
        stack = [n.name for n in self.outputs]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.nodes:
                continue
            seen.add(name)
            stack.extend(self.nodes[name].inputs)
        return seen

    def downstream(self, name: str, through: Iterable[str] = ()) -> list[Node]:
        """The nearest non-`through` consumers of a node, looking past ops in `through`
        (e.g. past dropout/reshape when asking "what does this conv feed?")."""
        skip = set(through)
        out: list[Node] = []
        seen: set[str] = set()
        stack = [s.name for s in self.successors(name)]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            node = self.nodes[n]
            if node.op in skip:
                stack.extend(s.name for s in self.successors(n))
            else:
                out.append(node)
        return out

    def upstream(self, name: str, through: Iterable[str] = ()) -> list[Node]:
        """The nearest non-`through` producers of a node."""
        skip = set(through)
        out: list[Node] = []
        seen: set[str] = set()
        stack = list(self.nodes[name].inputs)
        while stack:
            n = stack.pop()
            if n in seen or n not in self.nodes:
                continue
            seen.add(n)
            node = self.nodes[n]
            if node.op in skip:
                stack.extend(node.inputs)
            else:
                out.append(node)
        return out
