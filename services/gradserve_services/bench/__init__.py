"""Benchmarks behind `gradserve bench`. Each prints JSON lines with the peer measured in the same run."""


def significant(value: float, digits: int = 5) -> float:
    """`value` to `digits` significant digits: a figure printed this way is within 0.5 units of its
    last digit relative to its size, however small (fixed decimals lose tiny models' figures)."""
    return float(f"{value:.{digits}g}")
