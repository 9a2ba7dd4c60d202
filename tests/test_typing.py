"""The type check CI runs (`mypy`, configured in pyproject.toml) is strict enough to catch a
misspelled field: of a typed object in an annotated function, of a rule's options inside an
unannotated one (check_untyped_defs), and of the run's settings (the `RunConfig` protocol)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

MISSPELLED = textwrap.dedent(
    """\
    from netdoctor.measure.record import TrainingRun
    from netdoctor.rules.runtime.nd412_cannot_overfit_batch import Options


    def steps(run: TrainingRun) -> int:
        return run.stpes_run


    def unannotated(run):
        options = Options()
        return options.max_los_ratio, run.steps_run


    def rate(run: TrainingRun) -> float:
        return run.config.learing_rate


    def spelled_right(run: TrainingRun) -> float:
        return run.steps_run * Options().max_loss_ratio * run.config.learning_rate
    """
)


@pytest.mark.slow
def test_mypy_with_the_project_config_reports_misspelled_fields(tmp_path):
    api = pytest.importorskip("mypy.api")
    path = tmp_path / "misspelled.py"
    path.write_text(MISSPELLED, encoding="utf-8")
    out, err, status = api.run(
        [
            str(path),
            "--config-file",
            str(REPO / "pyproject.toml"),
            "--cache-dir",
            str(REPO / ".mypy_cache"),  # the one CI's type check filled
        ]
    )
    errors = re.findall(r"^.*misspelled\.py:(\d+): error: (.*)$", out, re.M)
    assert status == 1, out + err
    found = [(int(line), message.split(";")[0]) for line, message in errors]
    assert found == [
        (6, '"TrainingRun" has no attribute "stpes_run"'),
        (11, '"Options" has no attribute "max_los_ratio"'),
        (15, '"RunConfig" has no attribute "learing_rate"'),
    ], out
