"""gfa/device.py: the log's percentage keeps a small MFU readable (the scaling study reads it back)."""
from gfa.device import percent


def test_percent_one_decimal_and_two_significant_digits_below_a_tenth_of_a_percent():
    assert percent(0.516) == "51.6%" and percent(1.0) == "100.0%" and percent(0.001) == "0.1%"
    # a 4-layer, 32-wide model on an H200: 1.2e-5 of peak, which one decimal printed as 0.0 %
    assert percent(1.234e-5) == "0.0012%" and float(percent(1.234e-5)[:-1]) > 0
    assert percent(0.0) == "0.0%"
