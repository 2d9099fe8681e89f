"""Benchmarks behind `gradserve bench`. Each prints JSON lines with the peer measured in the same run."""
