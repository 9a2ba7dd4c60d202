"""netdoctor: finds why a PyTorch model does not train, and shows the fix."""

__version__ = "0.1.0"
