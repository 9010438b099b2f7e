"""Studies that measure a design choice of the toolkit on simulated data, runnable as modules."""
