"""Measuring: matrix cells, the runner, taps/qdiscs/counters, traffic, the on-host agent, the drop test."""
