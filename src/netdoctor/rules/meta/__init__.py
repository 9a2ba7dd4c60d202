"""ND0xx: how the graph was built (`GraphContext.outcome`): a fallback from symbolic tracing, a
forward that raised on the given input."""
