"""Code the tests share (not tests themselves): reference evaluators, estimator cases, tiny models, rule traces.

`tests/` is on sys.path (`pythonpath` in pyproject.toml), so test modules import these as `helpers.<module>`."""
