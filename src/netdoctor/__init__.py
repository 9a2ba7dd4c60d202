"""netdoctor: finds why a PyTorch model does not train, and shows the fix.

Importing netdoctor does not import torch (the command line's `--help`, `rules` and `explain`
stay fast); `watch` imports it when called.
"""

from netdoctor.errors import StopTraining
from netdoctor.version import __version__

__all__ = ["StopTraining", "__version__", "watch"]


def watch(model=None, optimizer=None, **options):
    """Watch the user's own training from inside: `doctor = netdoctor.watch(model, optimizer)`.

    `model`: an nn.Module or a list of them (None: every model that trains, found as it runs);
    `optimizer`: an Optimizer or a list (None: every optimizer that steps the watched models).
    Options: `every` (deep-measurement interval in steps, default 50), `select` / `ignore`
    (rule IDs or prefixes), `stop_on` ("error" | "warning" | "never": raise
    `netdoctor.StopTraining` from the optimizer step once such a finding is confirmed;
    `stop_action="flag"` only sets `doctor.should_stop`), `fail_on`, `output` and `format` (the
    report written by `close()`), `rule_options`, `announce` (one stderr line per confirmed
    severe finding), `static` (run the static rules on each model once), `name`,
    `tensorboard` (a directory or a `SummaryWriter`: the curves, per-layer values and findings
    also written as TensorBoard events; needs the tensorboard package).

    The returned Doctor has `findings`, `report(format="text", output=None)`, `observe_loss(v)`
    and `close()`, and is a context manager (`with netdoctor.watch(model, opt) as doctor:`),
    which closes it and swallows `StopTraining`.
    """
    from netdoctor.watcher.watching import watch as _watch

    return _watch(model, optimizer, **options)
