"""Rule implementations. Importing this package registers every rule with the registry."""

from netdoctor.rules import architecture, data, init, loop, meta, outputs, params, runtime, structure  # noqa: F401,E402  (registration)
from netdoctor.rules.registry import REGISTRY, Context, rule  # noqa: F401
