"""ND2xx: parameter and initialization problems."""

from __future__ import annotations

from netdoctor.fixes.patch import diff_fix, set_keyword
from netdoctor.rules._paths import live_at_init
from netdoctor.rules.registry import Context, rule

_BN_TYPES = (
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "SyncBatchNorm",
    "LazyBatchNorm1d",
    "LazyBatchNorm2d",
    "LazyBatchNorm3d",
)


@rule("ND203")
def batchnorm_momentum(ctx: Context):
    high = float(ctx.option("ND203", "max-momentum", 0.5))
    seen: set[str] = set()
    for node in ctx.graph.of_op("batchnorm"):
        key = node.module or node.name
        if key in seen:
            continue
        seen.add(key)
        momentum = node.attrs.get("momentum")
        if momentum is None or node.attrs.get("track_running_stats") is False:
            continue  # None = cumulative average, a valid choice
        if momentum >= high:
            why = (
                f"momentum={momentum:g} follows the TF/Keras convention; PyTorch updates "
                f"running = (1 - momentum) * running + momentum * batch, so running statistics "
                f"follow each batch almost exactly ({1 - momentum:.0%} of history kept) and "
                "eval-mode outputs jump around. PyTorch's 0.1 is Keras' 0.9."
            )
        elif momentum == 0:
            why = (
                "momentum=0 means the running statistics never update: eval mode normalizes "
                "with the initial mean 0 and variance 1, not the data's, so eval outputs "
                "differ from training."
            )
        else:
            continue
        onnx_momentum = node.attrs.get("onnx_momentum")
        if onnx_momentum is not None:
            why = (
                f"ONNX momentum={onnx_momentum:g} (ONNX weights the running value: it is "
                f"PyTorch's 1 - momentum) means PyTorch momentum={momentum:g}. " + why
            )
        loc = node.location
        summary = "set momentum=0.1 (PyTorch's default; equals Keras' 0.9)"
        fix = diff_fix(
            summary,
            loc.path if loc else None,
            lambda src, line=loc.line if loc else 0: set_keyword(
                src, line, _BN_TYPES, "momentum", "0.1"
            ),
            _snippet(node),
        )
        yield ctx.finding(
            "ND203",
            f"{key}: {why}",
            module=node.module,
            location=loc,
            fix=fix,
            evidence={"momentum": momentum, "onnx_momentum": node.attrs.get("onnx_momentum")},
            impact=2.0,
        )


def _snippet(node) -> str:
    features = node.attrs.get("num_features", "...")
    if node.attrs.get("onnx_momentum") is not None:
        return (
            f"# in the PyTorch source of this model (exports as ONNX momentum=0.9):\n"
            f"nn.BatchNorm2d({features}, momentum=0.1)"
        )
    return f"nn.{node.attrs.get('type', 'BatchNorm2d')}({features}, momentum=0.1)"


# -- ND202 constant-init ---------------------------------------------------------------------

_CONSTANT_INIT_CALLS = ("zeros_", "ones_", "constant_", "fill_(", "zero_()", "ones_like")


@rule("ND202")
def constant_init(ctx: Context):
    """A hidden conv/linear layer whose weights are all equal: its units stay identical."""
    from netdoctor.graph.ir import WEIGHT_OPS

    graph = ctx.graph
    seen: set[str] = set()
    live = live_at_init(graph)
    for node in graph.of_op(*WEIGHT_OPS):
        key = node.module or node.name
        info = node.params.get("weight")
        if key in seen or info is None or not info.all_equal or info.numel < 2:
            continue
        seen.add(key)
        if not _feeds_weight_layer(graph, node.name, live):
            continue  # the last layer may start at zero (a common, harmless choice)
        value = info.mean
        units = info.shape[0] if info.shape else "?"
        message = (
            f"{key}: all {info.numel} weights equal {value:g}, so its {units} units "
            "compute the same value, get the same gradient and stay identical forever "
            "(symmetry never breaks)"
            + (
                "; with zeros and a ReLU after it, no gradient flows back at all"
                if value == 0
                else ""
            )
            + ". Only the last layer may start constant."
        )
        loc = node.location
        attr = key.rsplit(".", 1)[-1]
        summary = (
            f"initialise {key} randomly: remove the constant init (PyTorch's default "
            "breaks symmetry) or use nn.init.kaiming_normal_"
        )
        snippet = f"nn.init.kaiming_normal_(self.{attr}.weight, nonlinearity='relu')\n"
        fix = diff_fix(
            summary,
            loc.path if loc else None,
            lambda src, a=attr: _replace_constant_init(src, a),
            snippet,
        )
        yield ctx.finding(
            "ND202",
            message,
            module=node.module,
            location=loc,
            fix=fix,
            evidence={"value": value, "numel": info.numel, "shape": list(info.shape)},
            impact=8.0,
        )


def _feeds_weight_layer(graph, name: str, live: set[str]) -> bool:
    """Whether another conv/linear layer lies downstream of this node (it is hidden). A path
    that reaches an addition first is the end of a residual branch (Fixup, ReZero and zero-conv
    initialise that layer to zero on purpose): not followed further. Nor do layers count whose
    output does not reach the model's output at init (`live`): a squeeze-excitation computed
    from the zero branch and multiplied back into it is part of that branch."""
    from netdoctor.graph.ir import WEIGHT_OPS

    stack, seen = [s.name for s in graph.successors(name)], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        node = graph.nodes[n]
        if node.op in WEIGHT_OPS and n in live:
            return True
        if node.op in ("add", "sub"):
            continue  # the end of a residual branch: zero-init there is a known technique
        stack.extend(s.name for s in graph.successors(n))
    return False


def _replace_constant_init(source: str, attr: str) -> str | None:
    """Swap a line like `nn.init.zeros_(self.fc2.weight)` for a Kaiming init of the same weight."""
    import re

    lines = source.splitlines(keepends=True)
    pattern = re.compile(rf"\b{re.escape(attr)}\.weight\b")
    for i, line in enumerate(lines):
        if pattern.search(line) and any(c in line for c in _CONSTANT_INIT_CALLS):
            indent = line[: len(line) - len(line.lstrip())]
            prefix = (
                "nn."
                if re.search(r"\bnn\.init\.", line)
                else ("torch.nn." if "torch.nn.init." in line else "nn.")
            )
            target = pattern.search(line)
            start = line.rfind("(", 0, target.start()) + 1
            expr = line[start : target.end()].strip() if start > 0 else f"self.{attr}.weight"
            lines[i] = f"{indent}{prefix}init.kaiming_normal_({expr}, nonlinearity='relu')" + (
                "\n" if line.endswith("\n") else ""
            )
            return "".join(lines)
    return None
