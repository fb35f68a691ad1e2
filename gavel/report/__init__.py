"""Reports for people: JSON, self-contained HTML with per-token heat maps, SARIF. Filled by the runtime
issue (`gavel audit`); like cli.py, the only layer that knows formats meant for people."""
