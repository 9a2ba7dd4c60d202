"""netdoctor's version (reports carry it)."""

__version__ = "0.1.0"
