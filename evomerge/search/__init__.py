"""Search: CMA-ES (and baselines) over merge genomes, scored by answer-only cross-entropy."""
