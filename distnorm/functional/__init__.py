"""Pure functions: references, norms, statistics. No modules, no state."""
