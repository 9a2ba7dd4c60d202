"""Errors the user caused (bad target, bad flag, bad data): reported as one line, exit code 2."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints `netdoctor: error: <message>` and exits 2."""


class StopTraining(BaseException):
    """Raised from inside the user's training by `netdoctor run --stop-on` / `watch(stop_on=...)`
    when a finding at that severity is confirmed. A BaseException (like KeyboardInterrupt), so a
    training loop's `except Exception:` does not swallow it; `netdoctor run` and the
    `with netdoctor.watch(...)` block catch it and write the report."""

    def __init__(self, finding=None, step: int | None = None):
        self.finding = finding
        self.step = step
        what = f"{finding.rule} {finding.name}" if finding is not None else "a finding"
        super().__init__(f"netdoctor stopped training at step {step}: {what}")
