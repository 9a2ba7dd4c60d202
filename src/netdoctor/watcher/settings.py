"""The watcher's options (`netdoctor run` flags, `netdoctor.watch(**options)`, the callbacks'
keyword arguments) and `LoopConfig`, the watched run's `TrainingRun.config`: the reading of the
user's own optimizer that the ND4xx rules' messages and fixes quote (`optimizer`,
`learning_rate`, `momentum`, `loss`, `steps`, `window`), in the same fields as the probe's
`ProbeConfig`.

Torch-free, so the CLI can validate flags before torch is imported.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from netdoctor.errors import UserError

if TYPE_CHECKING:
    from netdoctor.check import CheckOptions
    from netdoctor.rules.engine import RuleSettings

STOP_ON = ("error", "warning", "never")
STOP_ACTIONS = ("raise", "flag")
FORMATS = ("text", "json", "sarif", "github", "html")
FAIL_ON = ("error", "warning", "info", "never")

# Deep measurements (per-layer activations, gradient norms, update ratios) run on the first
# WARM_STEPS steps, then on log-spaced steps (8, 16, 32, ...) up to `every`, then every `every`
# steps: about 2% of the steps at the default, so the per-step cost stays a few fused norms.
DEFAULT_EVERY = 50
WARM_STEPS = 4
DEFAULT_DIST_TIMEOUT = 60.0


@runtime_checkable
class SummaryWriterLike(Protocol):
    """What the TensorBoard export writes to: `torch.utils.tensorboard.SummaryWriter`, a
    Lightning `TensorBoardLogger.experiment`, tensorboardX's `SummaryWriter`."""

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int | None = None) -> Any: ...

    def add_text(self, tag: str, text_string: str, global_step: int | None = None) -> Any: ...

    def flush(self) -> Any: ...


# The `tensorboard` option: a directory netdoctor writes its own event files to, a writer of the
# user's (or of the trainer's logger), or None/False (none; a trainer callback given None looks
# for the trainer's own TensorBoard logger).
TensorBoardTarget = str | os.PathLike[str] | SummaryWriterLike | bool | None

TENSORBOARD_EXTRA = "pip install 'netdoctor[tensorboard]' (or pip install tensorboard)"


class TensorBoardUnavailable(UserError, ImportError):
    """TensorBoard export was asked for and the tensorboard package is not installed (a
    UserError for the CLI's one line and exit 2; an ImportError for `watch()`)."""


def require_tensorboard() -> None:
    """The tensorboard package is importable (looked up, not imported: torch-free)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise TensorBoardUnavailable(
            f"TensorBoard export needs the tensorboard package: {TENSORBOARD_EXTRA}"
        )


@dataclass
class WatchOptions:
    """What `netdoctor.watch(model, optimizer, **options)` accepts (and `netdoctor run`'s
    flags fill). Unknown keywords are a TypeError, bad values a UserError."""

    every: int = DEFAULT_EVERY  # deep-measurement interval, in training steps
    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    stop_on: str = "never"  # stop training at a confirmed finding of this severity
    stop_action: str = "raise"  # "raise" StopTraining, or only "flag" doctor.should_stop
    fail_on: str = "error"
    output: str | None = None  # where doctor.report() writes by default
    format: str = "text"
    rule_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    announce: bool = True  # one line on stderr per confirmed severe finding
    static: bool = True  # run the static rules on each watched model once
    name: str | None = None  # how the report names the target (default: the model's class)
    # under torchrun: how long netdoctor's own exchange waits for the other ranks, in seconds
    # (a rank gone or out of step ends the comparison with a note; the user's collectives are
    # never touched)
    dist_timeout: float = DEFAULT_DIST_TIMEOUT
    # TensorBoard export (`netdoctor run --tensorboard DIR`): a directory, or a SummaryWriter
    # to write into (see `TensorBoardTarget`; docs/run.md#tensorboard lists the tags)
    tensorboard: TensorBoardTarget = None

    @classmethod
    def from_kwargs(cls, **options: Any) -> WatchOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        for key in ("select", "ignore"):
            if isinstance(options.get(key), str):
                options[key] = [v.strip() for v in options[key].split(",") if v.strip()]
        opts = cls(**{k: v for k, v in options.items() if v is not None})
        opts.validate()
        return opts

    def validate(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise UserError(f"every must be a positive number of steps, got {self.every!r}")
        if (
            isinstance(self.dist_timeout, bool)
            or not isinstance(self.dist_timeout, (int, float))
            or not self.dist_timeout > 0
        ):
            raise UserError(
                f"dist_timeout must be a positive number of seconds, got {self.dist_timeout!r}"
            )
        for key, allowed in (
            ("stop_on", STOP_ON),
            ("stop_action", STOP_ACTIONS),
            ("format", FORMATS),
            ("fail_on", FAIL_ON),
        ):
            value = getattr(self, key)
            if value not in allowed:
                raise UserError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
        self.check_tensorboard()
        if self.format == "html":  # its charts need plotly: say so before the training
            from netdoctor.report.charts import require_plotly

            require_plotly()
        self.rule_settings()  # a misspelled rule or option fails here, before training

    def check_tensorboard(self) -> None:
        """A directory (not a file; the tensorboard package installed) or a writer."""
        tb = self.tensorboard
        if tb is None or tb is False:
            return
        if isinstance(tb, (str, os.PathLike)):
            path = os.fspath(tb)
            if not path:
                raise UserError("tensorboard must name a directory, got an empty path")
            if os.path.exists(path) and not os.path.isdir(path):
                raise UserError(f"tensorboard: {path} is a file, not a directory")
            require_tensorboard()
            return
        if isinstance(tb, bool) or not isinstance(tb, SummaryWriterLike):
            raise UserError(
                f"tensorboard must be a directory or a SummaryWriter (or None), got {tb!r}"
            )

    def rule_settings(self) -> RuleSettings:
        """The rule selection and options (`rule_options` checked: a UserError names a bad
        key)."""
        from netdoctor.rules.engine import RuleSettings

        return RuleSettings.from_tables(
            self.select, self.ignore, self.rule_options, label=lambda key: f"rule_options[{key!r}]"
        )

    def check_options(self) -> CheckOptions:
        """The static check of a watched model, with the watcher's rules."""
        from netdoctor.check import CheckOptions

        return CheckOptions(rules=self.rule_settings())


_TORCH_OPTIMIZERS = (
    "SGD",
    "Adam",
    "AdamW",
    "Adamax",
    "Adagrad",
    "Adadelta",
    "ASGD",
    "LBFGS",
    "NAdam",
    "RAdam",
    "RMSprop",
    "Rprop",
    "SparseAdam",
    "Adafactor",
    "Muon",
)


@dataclass
class LoopConfig:
    """`TrainingRun.config` of a watched run: the user's optimizer as the rules quote it."""

    optimizer: str  # class name ("SGD", "AdamW", "MyOptimizer")
    learning_rate: float  # the first param group's lr at the first step
    momentum: float | None = None  # SGD/RMSprop momentum, when the optimizer has one
    weight_decay: float = 0.0
    loss: str = "unknown"  # the loss function backward ran on: cross_entropy, mse_loss, ...
    steps: int = 0
    batch_size: int | None = None
    seed: int | None = None
    window: float = 0.5  # share of the last measured steps for "over the run" statistics
    param_groups: int = 1
    lrs: list[float] = field(default_factory=list)  # every group's lr at the first step
    manual: bool = False  # no optimizer: the loop updates the weights by hand (lr estimated)

    @property
    def optimizer_expr(self) -> str:
        """How a fix snippet spells its constructor."""
        if self.optimizer in _TORCH_OPTIMIZERS:
            return f"torch.optim.{self.optimizer}"
        return self.optimizer

    def describe(self) -> str:
        extra = f", momentum {self.momentum:g}" if self.momentum else ""
        if self.weight_decay:
            extra += f", weight decay {self.weight_decay:g}"
        groups = f" in {self.param_groups} param groups" if self.param_groups > 1 else ""
        return (
            f"{self.steps} steps of {self.optimizer} (lr {self.learning_rate:g}{extra}"
            f"{groups}), {self.loss} loss"
        )
