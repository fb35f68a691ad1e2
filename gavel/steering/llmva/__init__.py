"""LLM-VA vector alignment: SVM answer/benign directions per sublayer, the closed-form weight edit, its runtime
projection, and the generate-judge-refit loop."""
