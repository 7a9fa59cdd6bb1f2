"""The version of mlkd (a module of its own, so that any module can name it without importing the package API)."""

__version__ = "0.2.0"
