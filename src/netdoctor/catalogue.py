"""The rule catalogue: stable IDs, names, default severities and one-line summaries.

Torch-free: `netdoctor rules` and `netdoctor explain` read only this module and the docs.
Which rules are implemented is known from the registry (netdoctor.rules), which imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from netdoctor.findings import Severity


@dataclass(frozen=True)
class RuleInfo:
    id: str
    name: str
    severity: Severity
    stage: str  # "meta", "graph", "params", "data", "runtime", "loop"
    summary: str


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO

RULES: dict[str, RuleInfo] = {
    r.id: r
    for r in [
        RuleInfo(
            "ND001",
            "trace-fallback",
            _I,
            "meta",
            "symbolic tracing failed; the report was built from a fallback",
        ),
        RuleInfo(
            "ND002", "forward-failure", _E, "meta", "the model's forward raised on the given input"
        ),
        RuleInfo(
            "ND101",
            "deep-plain-stack",
            _W,
            "graph",
            "many weight layers in series with no normalization and no skip connection",
        ),
        RuleInfo(
            "ND102",
            "saturating-activation-chain",
            _W,
            "graph",
            "3+ sigmoid/tanh activations in series without normalization between",
        ),
        RuleInfo(
            "ND103",
            "dead-submodule",
            _W,
            "graph",
            "a submodule with trainable parameters whose output never reaches the output",
        ),
        RuleInfo(
            "ND104",
            "unregistered-submodule",
            _E,
            "graph",
            "modules held in a plain list/dict/tuple instead of ModuleList/ModuleDict",
        ),
        RuleInfo(
            "ND105",
            "softmax-output",
            _W,
            "graph",
            "the model returns softmax/log-softmax (CrossEntropyLoss applies it again)",
        ),
        RuleInfo(
            "ND106",
            "activation-on-logits",
            _W,
            "graph",
            "a ReLU-family activation after the final layer",
        ),
        RuleInfo(
            "ND107",
            "linear-collapse",
            _W,
            "graph",
            "two weight layers joined by nothing nonlinear collapse to one linear map",
        ),
        RuleInfo(
            "ND108",
            "detached-forward",
            _E,
            "graph",
            ".detach()/.data/no_grad inside forward cuts parameters off from the output",
        ),
        RuleInfo(
            "ND109",
            "bias-before-norm",
            _I,
            "graph",
            "a conv/linear bias immediately followed by BatchNorm is cancelled",
        ),
        RuleInfo(
            "ND110",
            "dropout-before-batchnorm",
            _I,
            "graph",
            "dropout feeding BatchNorm shifts variance between train and eval",
        ),
        RuleInfo(
            "ND111",
            "redundant-activation",
            _I,
            "graph",
            "the same idempotent activation applied twice in a row",
        ),
        RuleInfo(
            "ND201",
            "init-scale",
            _W,
            "params",
            "weight std far from the fan-in-preserving scale for the following activation",
        ),
        RuleInfo(
            "ND202",
            "constant-init",
            _E,
            "params",
            "a hidden weight layer whose weights are all equal: symmetry never breaks",
        ),
        RuleInfo(
            "ND203",
            "batchnorm-momentum",
            _W,
            "params",
            "BatchNorm momentum >= 0.5 (Keras convention) or == 0",
        ),
        RuleInfo(
            "ND204",
            "signal-collapse",
            _W,
            "params",
            "activations shrink or grow across depth by orders of magnitude at init",
        ),
        RuleInfo(
            "ND301",
            "input-not-normalized",
            _W,
            "data",
            "inputs far from unit scale (e.g. raw 0..255 pixels)",
        ),
        RuleInfo(
            "ND302",
            "feature-scale-mismatch",
            _W,
            "data",
            "input features/channels whose scales differ by orders of magnitude",
        ),
        RuleInfo(
            "ND303",
            "label-mismatch",
            _E,
            "data",
            "labels outside [0, C), non-integer class labels, or C != classes seen",
        ),
        RuleInfo("ND304", "non-finite-input", _E, "data", "NaN/Inf in the data"),
        RuleInfo(
            "ND401",
            "non-finite",
            _E,
            "runtime",
            "NaN/Inf in loss, activations or gradients, localized to its producer",
        ),
        RuleInfo(
            "ND402",
            "exploding-gradients",
            _W,
            "runtime",
            "gradient norms growing without bound or far above the weights' scale",
        ),
        RuleInfo(
            "ND403",
            "vanishing-gradients",
            _W,
            "runtime",
            "early layers' gradients orders of magnitude below the last layers'",
        ),
        RuleInfo(
            "ND404",
            "dead-relu",
            _W,
            "runtime",
            "a large share of a ReLU layer's units never active",
        ),
        RuleInfo(
            "ND405",
            "saturated-activations",
            _W,
            "runtime",
            "most sigmoid/tanh pre-activations deep in saturation",
        ),
        RuleInfo(
            "ND406",
            "update-ratio",
            _W,
            "runtime",
            "per-layer update/weight ratio far outside ~1e-3",
        ),
        RuleInfo(
            "ND407",
            "loss-stalled",
            _W,
            "runtime",
            "loss not decreasing over the probe; accuracy at chance",
        ),
        RuleInfo("ND408", "initial-loss", _W, "runtime", "cross-entropy at init far from ln(C)"),
        RuleInfo(
            "ND409",
            "prediction-collapse",
            _W,
            "runtime",
            "predictions collapse to one or two classes",
        ),
        RuleInfo(
            "ND410",
            "no-gradient",
            _E,
            "runtime",
            "a trainable parameter receives no gradient after backward",
        ),
        RuleInfo(
            "ND411",
            "batchnorm-train-eval-gap",
            _W,
            "runtime",
            "outputs differ strongly between train and eval mode",
        ),
        RuleInfo(
            "ND412",
            "cannot-overfit-batch",
            _W,
            "runtime",
            "the model cannot drive the loss down on one small fixed batch",
        ),
        RuleInfo(
            "ND501",
            "grads-not-cleared",
            _E,
            "loop",
            "gradients accumulate across optimizer steps: no zero_grad() between them",
        ),
        RuleInfo(
            "ND502",
            "params-not-optimized",
            _E,
            "loop",
            "parameters that receive gradients but are in no optimizer (or all frozen)",
        ),
        RuleInfo(
            "ND503",
            "step-changes-nothing",
            _E,
            "loop",
            "optimizer.step() runs but no parameter changes (lr 0, gradients None/zero)",
        ),
        RuleInfo(
            "ND504",
            "eval-mode-training",
            _W,
            "loop",
            "backward and step while Dropout/BatchNorm modules are in eval mode",
        ),
        RuleInfo(
            "ND505",
            "lr-collapse",
            _W,
            "loop",
            "the learning rate falls by orders of magnitude early in the run",
        ),
        RuleInfo(
            "ND506",
            "loss-pairing",
            _E,
            "loop",
            "a loss fed what it does not expect (probabilities into cross-entropy, ...)",
        ),
        RuleInfo(
            "ND507",
            "loss-broadcast",
            _E,
            "loop",
            "loss input and target of different shapes that broadcast",
        ),
        RuleInfo(
            "ND508",
            "replicas-diverged",
            _E,
            "loop",
            "under DDP, parameters that must be identical on every rank differ",
        ),
    ]
}

BY_NAME = {r.name: r for r in RULES.values()}


def lookup(key: str) -> RuleInfo:
    """Find a rule by ID (ND101, nd101) or by name (deep-plain-stack)."""
    k = key.strip()
    if k.upper() in RULES:
        return RULES[k.upper()]
    if k.lower() in BY_NAME:
        return BY_NAME[k.lower()]
    raise KeyError(key)


def matches(rule_id: str, patterns: list[str]) -> bool:
    """True when a rule ID is selected by any pattern: 'ND1' selects ND1xx, 'ALL' selects all."""
    for p in patterns:
        p = p.strip().upper()
        if p == "ALL" or rule_id.startswith(p):
            return True
        if p.lower() in BY_NAME and BY_NAME[p.lower()].id == rule_id:
            return True
    return False
