"""The loop facts: what only the watcher sees inside the user's own training loop.

`LoopFacts` is to the ND5xx rules (`netdoctor.rules.loop`, through `ctx.loop`) what
`measure.record.TrainingRun` is to the ND4xx rules: plain numbers and source locations gathered
by the hooks while the script trains, judged later (and live, for the announcement) by the
rules. Torch-free: tensors never end up here, only Python floats, ints, names and locations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from netdoctor.findings import Location


@dataclass
class OptimizerFacts:
    """One optimizer the training stepped."""

    index: int
    name: str  # class name: "SGD", "Adam", "MyOptimizer"
    label: str  # how reports name it: "SGD", or "SGD#2" when two share a class
    site: Location | None = None  # where it was built (netdoctor run records it)
    step_site: Location | None = None  # the user's `optimizer.step()` line (first seen)
    steps: int = 0
    n_params: int = 0
    n_trainable: int = 0  # parameters with requires_grad
    models: list[str] = field(default_factory=list)  # labels of the models it trains
    lr: list[list[float]] = field(default_factory=list)  # per step, per param group
    grad_norm: list[float] = field(default_factory=list)  # total, per step (nan: no gradient)
    loss: list[float] = field(default_factory=list)  # per step (nan: no loss seen)
    # ND501: steps whose gradients still held a previous step's (no reset in between), and the
    # line of the backward that accumulated into them
    stale_steps: list[int] = field(default_factory=list)
    stale_backward_site: Location | None = None
    closure: bool = False  # it steps with a closure (LBFGS): forward and backward run inside
    # no optimizer: the loop updates the weights by hand (`watcher.manual`); each step begins
    # at a backward, and `model_name` is the user's name for the model it updates
    manual: bool = False
    model_name: str | None = None
    # ND503: steps after which no parameter had changed, and why (lr-zero, no-grad, zero-grad)
    unchanged_steps: list[int] = field(default_factory=list)
    unchanged_reasons: dict[str, int] = field(default_factory=dict)
    changed_steps: int = 0
    # ND504: steps that trained with Dropout/BatchNorm modules of its models in eval mode
    eval_steps: list[int] = field(default_factory=list)
    eval_modules: dict[str, str] = field(default_factory=dict)  # qualified name -> type
    eval_models: list[str] = field(default_factory=list)

    @property
    def initial_lr(self) -> float | None:
        return max(self.lr[0]) if self.lr and self.lr[0] else None

    def lr_curve(self) -> list[float]:
        """The largest learning rate of any param group, per step."""
        return [max(groups) if groups else float("nan") for groups in self.lr]


@dataclass
class ModelFacts:
    """One model the training ran forward and backward through."""

    label: str  # "Net", or "Generator" / "Discriminator"; "Net#2" when two share a class
    class_name: str
    site: Location | None = None  # where the root model was built (or its class line)
    input_shape: tuple[int, ...] | None = None  # first positional tensor of the first forward
    input_dtype: str | None = None
    compiled: bool = False  # torch.compile'd: not instrumented
    optimized: int = 0  # trainable parameters held by an optimizer
    # ND502: trainable parameters that had a gradient at a measured step while no optimizer
    # held them: qualified name -> number of measured steps
    unoptimized: dict[str, int] = field(default_factory=dict)
    unoptimized_sites: dict[str, Location] = field(default_factory=dict)  # module -> built at
    grad_checks: int = 0  # measured steps at which the check ran
    eval_site: Location | None = None  # the last `.eval()` / `.train(False)` on it or a child
    # the watched models whose inputs came from its output (it is a part of a larger network:
    # an encoder feeding a head, a generator feeding its discriminator)
    feeds: list[str] = field(default_factory=list)


@dataclass
class LossCallFacts:
    """One loss function called at one line of the user's code."""

    fn: str  # "cross_entropy", "nll_loss", "binary_cross_entropy", "mse_loss", ...
    site: Location | None
    calls: int = 0
    input_shape: tuple[int, ...] | None = None
    target_shape: tuple[int, ...] | None = None
    input_producer: str | None = None  # autograd node that made the input ("SoftmaxBackward0")
    checked: int = 0  # calls whose values were examined
    # ND506: examined calls whose input was the wrong kind for this loss
    probabilities: int = 0  # softmax/sigmoid outputs where logits (or log-probs) belong
    not_log_probs: int = 0  # nll_loss fed values that are not log-probabilities
    out_of_range: int = 0  # binary_cross_entropy fed values outside [0, 1]
    input_min: float | None = None
    input_max: float | None = None
    # ND507: the shapes met by broadcasting into a larger one
    broadcast_shape: tuple[int, ...] | None = None
    broadcast_calls: int = 0
    all_ignored: int = 0  # cross_entropy/nll calls where every target was ignore_index
    ignore_index: int | None = None
    raised: str | None = None  # the exception the loss itself raised


@dataclass
class SchedulerFacts:
    """An lr scheduler's `.step()` calls at one line."""

    name: str
    site: Location | None
    calls: int = 0
    first_iteration: int | None = None  # the training step during which it was first called
    last_iteration: int | None = None


@dataclass
class ReplicaDivergence:
    """The first exchange step at which replicated parameters differed across ranks (ND508)."""

    step: int
    model: str  # the label of the watched model the parameter belongs to
    parameter: str  # qualified name of the first diverging tensor, in the model's order
    ranks: list[int]  # ranks whose copy differs from rank 0's
    difference: float  # largest |checksum difference| / the tensor's norm, over those ranks
    tensors: int  # replicated tensors that differed at that step ...
    compared: int  # ... of this many compared
    last_equal_step: int | None = None  # the last exchange at which every copy agreed
    added_after_wrap: bool = False  # the tensor was not in the model when DDP wrapped it


@dataclass
class BypassFacts:
    """Training forwards that called the module inside a DDP wrapper directly."""

    model: str
    site: Location | None  # the user's line of the first such call
    calls: int = 0


@dataclass
class DistributedFacts:
    """A torch.distributed run as this rank saw it: what the ranks compared on deep steps."""

    rank: int
    world_size: int
    backend: str | None = None
    exchanges: int = 0  # deep steps whose statistics every rank compared
    compared_tensors: int = 0  # replicated parameter tensors per exchange (ND508)
    broken: str | None = None  # why the comparison stopped (a rank gone, a timeout, ...)
    wrapper_sites: list[Location] = field(default_factory=list)  # the DDP(...) lines
    bypass: list[BypassFacts] = field(default_factory=list)
    divergence: ReplicaDivergence | None = None
    last_equal_step: int | None = None  # the latest exchange at which every replica agreed
    largest_difference: float = 0.0  # over all exchanges (replicas should be bitwise equal)
    # rank -> (first step with a non-finite loss or gradient, "loss" or "gradient"), as the
    # exchanged statistics showed it
    nonfinite: dict[int, tuple[int, str]] = field(default_factory=dict)
    stop_requested: dict[int, str] = field(default_factory=dict)  # rank -> rule it stopped on
    # sharded (FSDP/DTensor) models: (step, the whole model's gradient norm) on exchange steps,
    # reduced over the shards (each rank's per-step norm is its own shards')
    grad_norms: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ScalerFacts:
    """One GradScaler of the loop (mixed precision): what it did each step (ND601-ND603)."""

    label: str  # "GradScaler", "GradScaler#2" when two are used
    enabled: bool = True
    steps: int = 0  # scaler.step() calls
    skipped: list[int] = field(default_factory=list)  # 1-based scaler steps with no update
    skipped_losses: list[float] = field(default_factory=list)  # each skipped step's loss
    scale: list[float] = field(default_factory=list)  # the scale after each update()
    initial_scale: float | None = None
    scale_site: Location | None = None  # the user's `scaler.scale(loss)` line
    step_site: Location | None = None  # the user's `scaler.step(optimizer)` line
    unscale_calls: int = 0  # the user's own unscale_ calls
    # ND602: clip_grad_norm_/clip_grad_value_ on gradients still multiplied by the scale
    scaled_clips: int = 0
    clips: int = 0  # every clip call while this scaler was in use
    clip_site: Location | None = None
    clip_kind: str = ""  # "norm" | "value"
    clip_limit: float | None = None
    clip_seen_norm: float | None = None  # what the clip returned (the scaled total norm)
    clip_scale: float | None = None  # the scale then
    # ND603: scaler.step() with no backward of a scaled loss since the previous step
    unscaled_backward_steps: int = 0
    scaled_backward_steps: int = 0
    unscaled_backward_site: Location | None = None
    # the module a non-finite forward came from (the NaN localisation of a skipped step)
    overflow_module: str | None = None

    @property
    def min_scale(self) -> float | None:
        return min(self.scale) if self.scale else None


@dataclass
class PrecisionFacts:
    """The low-precision (fp16/bf16) parameters an optimizer updates in place (ND604)."""

    optimizer: str  # the optimizer's label
    dtype: str  # "float16" | "bfloat16": the most common low-precision dtype
    low_params: int = 0  # trainable low-precision parameters
    low_elements: int = 0
    params: int = 0  # all trainable parameters
    eps: float | None = None  # Adam-family eps (smallest over param groups)
    site: Location | None = None  # where the optimizer was built (or stepped)
    # over the measured updates: elements that had a nonzero gradient, and of those, the ones
    # the update left unchanged (rounded away)
    with_grad: int = 0
    unchanged: int = 0
    measured_steps: int = 0

    @property
    def unchanged_share(self) -> float | None:
        return self.unchanged / self.with_grad if self.with_grad else None


@dataclass
class LoopFacts:
    """Everything the ND5xx rules read (ctx.loop)."""

    iterations: int = 0  # steps of the first optimizer that stepped (the training step)
    optimizers: list[OptimizerFacts] = field(default_factory=list)
    models: list[ModelFacts] = field(default_factory=list)
    losses: dict[tuple, LossCallFacts] = field(default_factory=dict)
    schedulers: dict[tuple, SchedulerFacts] = field(default_factory=dict)
    backward_calls: int = 0
    backward_site: Location | None = None
    finished: bool = False  # the run is over (end-of-run judgements may be made)
    stopped: str | None = None  # "non-finite", "stop-on", "exception", "interrupted"
    error: str | None = None  # the exception that ended the script ("ValueError: ...")
    distributed: DistributedFacts | None = None  # under torchrun / DDP: the ranks' comparison
    scalers: list[ScalerFacts] = field(default_factory=list)  # mixed precision (ND601-ND603)
    precision: list[PrecisionFacts] = field(default_factory=list)  # low-precision weights (ND604)

    def loss_calls(self) -> list[LossCallFacts]:
        return list(self.losses.values())

    def model(self, label: str) -> ModelFacts | None:
        return next((m for m in self.models if m.label == label), None)
