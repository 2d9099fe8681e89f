"""Tests of the optimizers, checkpoints and the Ray cluster (workers, parameter servers, coordinator)."""
