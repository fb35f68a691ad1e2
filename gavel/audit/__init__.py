"""Audits: guard a model over a data set and report per-rule fires (locally or on a Ray cluster), as JSON, a
self-contained HTML page with per-token heat maps, or SARIF."""
