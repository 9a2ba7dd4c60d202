"""Rule implementations. Importing this package registers every rule with the registry."""

from netdoctor.rules import (  # noqa: F401  (registration)
    architecture,
    data,
    distributed,
    init,
    loop,
    meta,
    outputs,
    params,
    runtime,
    structure,
)
from netdoctor.rules.registry import REGISTRY, Context, rule  # noqa: F401
