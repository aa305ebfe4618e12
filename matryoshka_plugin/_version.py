"""The package's version, in a leaf that imports nothing (the root and the SAELens export read it)."""

__version__ = "0.1.0"
