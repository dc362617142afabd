"""Diagnostics for developers of vdit-sparse (not part of the library); run each with ``python -m``."""
