"""modelport: put a trained image model into production in minutes."""

__version__ = "0.1.0"
