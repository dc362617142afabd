"""The repository's scripts, run from its root (a package's modules as ``python -m scripts.<package>.<module>``)."""
