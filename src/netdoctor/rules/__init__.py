"""Rule implementations. Importing this package registers every rule with the registry."""

from netdoctor.rules.registry import REGISTRY, Context, rule  # noqa: F401
from netdoctor.rules import meta, architecture, params, data, runtime, outputs, structure, init  # noqa: F401,E402  (registration)
