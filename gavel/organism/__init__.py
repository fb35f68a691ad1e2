"""organism."""
