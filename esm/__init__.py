"""stepstone's bottom layer: task data, encoders, Embedding Space Maps and the registry."""

__version__ = "0.1.0"
