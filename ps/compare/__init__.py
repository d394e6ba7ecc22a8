"""ps-compare: several update modes on the same seed, data, model and faults; a report of which
converges fastest in wall-clock time and in steps."""
