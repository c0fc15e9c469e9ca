"""The one place the fastseg version lives (setup.py reads it without importing fastseg)."""

__version__ = "0.1.0"
