"""Rule tests: the case formats (`cases`) and the runner (`run`) that checks trace cases against the compiled
rules and text cases against a scan function."""
