"""Measuring and modelling speed: `benchmark` (one process, and `--processes N`) and `scaling-model`."""
