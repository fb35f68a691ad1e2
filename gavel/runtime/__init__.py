"""The runtime: the monitor that scores CEs and steps rules inside the model's forward passes, its per-batch
sessions, events and verdicts, the rules' interventions, the Python guardrail and the audit log."""
