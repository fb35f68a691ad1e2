"""The rule pack the audit tests (local and on Ray) run."""

PACK = """
rules:
  - name: quiz
    title: Quiz question
    severity: high
    condition: benchmark in user
    action: block "No quizzes."
  - name: harm
    title: Harmful request
    groups: {harm: [threat, weapons, fraud, self_harm, hate]}
    condition: 1 of harm
    action: alert "harm"
"""
