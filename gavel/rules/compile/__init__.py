"""The rule compiler: rules lowered to one tensor program that evaluates them token by token with fixed-size state."""
