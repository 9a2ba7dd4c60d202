"""What the runtime rules share: how they name a module and its line, how their fixes spell the
user's optimizer, the note for a batch the time budget cut, and the learning-rate remedies."""

from __future__ import annotations

from netdoctor.findings import Finding, Location
from netdoctor.measure.record import TrainingRun
from netdoctor.rules.verification import Remedy, RemedyContext, lr_remedy

_TORCH_OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}


# Optimizers whose update does not scale with the gradient (Adam's m / sqrt(v), a sign): a
# gradient far larger than its weight moves the weight by about lr all the same.
ADAPTIVE_OPTIMIZERS = {
    "adam", "adamw", "adamax", "nadam", "radam", "sparseadam", "adagrad", "adadelta", "rmsprop",
    "adafactor", "lion", "lamb",
}  # fmt: skip


def adaptive(optimizer: str | None) -> bool:
    """Whether the optimizer (its class name or the probe's name for it) is scale-invariant."""
    return bool(optimizer) and str(optimizer).lower().replace("_", "") in ADAPTIVE_OPTIMIZERS


def optimizer_expr(cfg: object) -> str:
    """How the fix snippets spell the optimizer's class: the probe's sgd/adam/adamw, or the
    class a watched run trained with (`optimizer_expr` of the watcher's settings: torch.optim.X
    for torch's own, the bare name for the user's)."""
    expr = getattr(cfg, "optimizer_expr", None)
    if expr:
        return str(expr)
    optimizer = str(getattr(cfg, "optimizer", ""))
    name = _TORCH_OPTIMIZERS.get(optimizer.lower(), optimizer)
    return f"torch.optim.{name}"


def lr_snippet(run: TrainingRun, factor: float) -> str:
    cfg = run.config
    lr = cfg.learning_rate * factor
    if getattr(cfg, "manual", False):  # the loop updates the weights by hand: its own lr
        return (
            f"lr = {lr:g}  # the step of the loop's own update; was about {cfg.learning_rate:g}\n"
        )
    sgd = str(cfg.optimizer).lower() == "sgd"
    momentum = getattr(cfg, "momentum", None)
    extra = f", momentum={momentum:g}" if sgd and momentum else ""
    return (
        f"optimizer = {optimizer_expr(cfg)}(model.parameters(), lr={lr:g}{extra})  "
        f"# was lr={cfg.learning_rate:g}\n"
    )


def site(run: TrainingRun, module: str | None) -> Location | None:
    """Where the user's code builds a module of the run."""
    return run.site(module) if module else None


def display(module: str | None, run: TrainingRun) -> str:
    """A module as messages name it: `net.2 (ReLU)`."""
    if module is None:
        return "?"
    if module == "":
        return "the model's own forward"
    t = run.module_types.get(module)
    return f"{module} ({t})" if t else module


def batch_cut_text(cut: tuple[int, int]) -> str:
    return (
        f" The time budget cut the batch from {cut[1]} to {cut[0]} samples, whose gradients "
        "are noisier: reported as info (probe with --batch-size or a larger --time-budget "
        "to judge it)."
    )


def lower_lr(finding: Finding, context: RemedyContext) -> Remedy:
    """The remedy of the symptoms of too large a learning rate: a tenth of it (and, when that
    is not enough, a tenth again)."""
    return lr_remedy(finding.rule, context.run.config.learning_rate, 0.1, retry=True)


def raise_lr(finding: Finding, context: RemedyContext) -> Remedy:
    """The remedy of weights that barely move: ten times the learning rate."""
    return lr_remedy(finding.rule, context.run.config.learning_rate, 10.0)


# What a model that does not learn (ND407, ND409) most likely follows from, in order: the
# training-loop bugs first (steps that change nothing, gradients that pile up, softmax fed to
# cross_entropy, ...), then the data, the static problems and the other runtime symptoms.
# Keys: a rule ID, or ND406+ / ND406- for update ratios that are too large / too small.
LOOP_ROOTS = (
    "ND503", "ND502", "ND506", "ND507", "ND501", "ND601", "ND602", "ND603", "ND604", "ND505",
    "ND504",
)  # fmt: skip
NOT_LEARNING = (
    "ND304", "ND303", "ND302", "ND301", "ND202", "ND410", "ND108", "ND104", "ND103", "ND105",
    "ND106", "ND401", "ND404", "ND403", "ND405", "ND406+", "ND406-", "ND402", "ND102", "ND101",
    "ND201", "ND204",
)  # fmt: skip
