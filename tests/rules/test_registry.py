"""The registry of rule units: every module under netdoctor/rules/<stage>/ is a rule whose ID
says its stage, whose options are a frozen dataclass of TOML keys, and which the catalogue of
`netdoctor rules` / `explain` lists (without importing torch: tests/cli/test_cli_usage.py)."""

from __future__ import annotations

import dataclasses

import pytest

from netdoctor.catalogue import RULES
from netdoctor.errors import UserError
from netdoctor.rules.base import RuleOptions, Stage
from netdoctor.rules.registry import all_rules

# ND0xx meta, ND1xx graph, ND2xx params, ND3xx data, ND4xx runtime, ND5xx loop; ND6xx mixed
# precision, read off a measured run (runtime) or the user's loop (loop).
STAGE_OF_HUNDRED = [
    (Stage.META,), (Stage.GRAPH,), (Stage.PARAMS,), (Stage.DATA,), (Stage.RUNTIME,), (Stage.LOOP,),
    (Stage.RUNTIME, Stage.LOOP),
]  # fmt: skip


def test_the_catalogue_is_the_registry():
    assert RULES == all_rules()
    assert list(RULES) == sorted(RULES)
    assert len({r.name for r in RULES.values()}) == len(RULES)


@pytest.mark.parametrize("rule_id", all_rules())
def test_a_rules_id_says_its_stage(rule_id):
    assert all_rules()[rule_id].stage in STAGE_OF_HUNDRED[int(rule_id[2])]


@pytest.mark.parametrize("rule_id", all_rules())
def test_a_rules_options_are_a_frozen_dataclass_of_toml_keys(rule_id):
    options = all_rules()[rule_id].options
    assert issubclass(options, RuleOptions) and dataclasses.is_dataclass(options)
    defaults = options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        defaults.__setattr__("x", 1)
    keys = options.keys()
    assert RuleOptions.SEVERITY not in keys
    assert all(isinstance(v, (int, float, str)) and not isinstance(v, bool) for v in keys.values())
    assert options.parse({**keys, "severity": "info"}, rule_id) == defaults
    with pytest.raises(UserError, match="unknown option 'no-such-key'"):
        options.parse({"no-such-key": 1}, rule_id)
