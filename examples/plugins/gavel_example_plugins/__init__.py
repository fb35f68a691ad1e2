"""An example third-party plugin package for gavel (see README.md)."""
