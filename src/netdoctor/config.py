"""`[tool.netdoctor]` in pyproject.toml: found from the cwd upwards; the CLI overrides it."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netdoctor.errors import UserError
from netdoctor.loading.seeding import DEFAULT_SEED, parse_seed

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

KNOWN_KEYS = {
    "select",
    "ignore",
    "fail-on",
    "input-shape",
    "input-dtype",
    "targets",
    "rules",
    "probe",
    "run",
    "format",
    "seed",
}


@dataclass
class Config:
    path: Path | None = None
    select: list[str] = field(default_factory=lambda: ["ALL"])
    ignore: list[str] = field(default_factory=list)
    fail_on: str = "error"
    input_shape: str | None = None
    input_dtype: str | None = None
    targets: list[str] = field(default_factory=list)
    format: str | None = None
    seed: int = DEFAULT_SEED
    rules: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-rule options
    probe: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)  # [tool.netdoctor.run]: every, stop-on


def find_pyproject(start: Path | None = None) -> Path | None:
    here = (start or Path.cwd()).resolve()
    for folder in [here, *here.parents]:
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_config(explicit: str | None = None) -> Config:
    path = Path(explicit) if explicit else find_pyproject()
    if path is None:
        return Config()
    if not path.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None
    table = data.get("tool", {}).get("netdoctor")
    if table is None:
        return Config(path=None)
    unknown = sorted(set(table) - KNOWN_KEYS)
    if unknown:
        raise UserError(
            f"{path}: unknown key(s) in [tool.netdoctor]: {', '.join(unknown)} "
            f"(known: {', '.join(sorted(KNOWN_KEYS))})"
        )

    def strings(key: str) -> list[str] | None:
        value = table.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise UserError(f"{path}: [tool.netdoctor] {key} must be a list of strings")
        return value

    cfg = Config(path=path)
    cfg.select = strings("select") or cfg.select
    cfg.ignore = strings("ignore") or []
    cfg.targets = strings("targets") or []
    cfg.fail_on = str(table.get("fail-on", cfg.fail_on))
    shape = table.get("input-shape")
    if isinstance(shape, list):
        shape = ",".join(str(s) for s in shape)
    cfg.input_shape = shape
    cfg.input_dtype = table.get("input-dtype")
    cfg.format = table.get("format")
    if "seed" in table:
        cfg.seed = parse_seed(table["seed"], f"{path}: [tool.netdoctor] seed")
    rules = table.get("rules", {})
    if not isinstance(rules, dict):
        raise UserError(f"{path}: [tool.netdoctor.rules] must be a table of rule tables")
    from netdoctor.catalogue import lookup
    from netdoctor.rules.engine import RuleSettings

    for key, options in rules.items():
        try:
            rid = lookup(key).id
        except KeyError:
            raise UserError(f"{path}: [tool.netdoctor.rules.{key}]: no such rule") from None
        if not isinstance(options, dict):
            raise UserError(f"{path}: [tool.netdoctor.rules.{key}] must be a table")
        cfg.rules[rid] = dict(options)
    # every option is checked now, so a misspelled one fails here, naming this file
    RuleSettings.from_tables(
        tables=cfg.rules, label=lambda rid: f"{path}: [tool.netdoctor.rules.{rid}]"
    )
    probe = table.get("probe", {})
    if not isinstance(probe, dict):
        raise UserError(f"{path}: [tool.netdoctor.probe] must be a table")
    cfg.probe = probe
    run = table.get("run", {})
    if not isinstance(run, dict):
        raise UserError(f"{path}: [tool.netdoctor.run] must be a table")
    cfg.run = run
    return cfg
