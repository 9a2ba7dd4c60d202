"""Loading user models: parse targets, import user code, build modules, record construction
sites."""
