"""A rule's options: a frozen dataclass per rule, read from its `[tool.netdoctor.rules.NDxxx]`
table (`netdoctor.rules.engine.RuleSettings` parses the tables)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from netdoctor.errors import UserError


@dataclass(frozen=True)
class RuleOptions:
    """Base of every rule's options: a frozen dataclass whose fields are the keys of its
    `[tool.netdoctor.rules.NDxxx]` table (`dead_fraction` is `dead-fraction`), with their
    defaults. `severity` is every rule's key and not a field (the engine applies it)."""

    SEVERITY: ClassVar[str] = "severity"

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """{TOML key: default} of the options."""
        return {f.name.replace("_", "-"): f.default for f in dataclasses.fields(cls)}

    @classmethod
    def parse(cls, table: Mapping[str, Any], where: str) -> RuleOptions:
        """Options from a config table: known keys only, each converted to its field's type
        (a TOML integer is a valid float); a bad key or value is a UserError naming `where`."""
        known = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key == cls.SEVERITY:
                continue
            field = known.get(key)
            if field is None:
                names = ", ".join(sorted([*known, cls.SEVERITY]))
                raise UserError(f"{where}: unknown option {key!r} (known: {names})")
            kind: type = type(field.default)  # every option has a default
            try:
                if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                    raise ValueError
                values[field.name] = kind(value)
            except (TypeError, ValueError):
                raise UserError(
                    f"{where}: {key} must be a {kind.__name__}, got {value!r}"
                ) from None
        return cls(**values)


@dataclass(frozen=True)
class NoOptions(RuleOptions):
    """A rule with nothing to configure but its severity."""
