import argparse

import pytest

from pipeline import cli


def test_positive_refuses_zero_and_negative():
    parse = cli.positive(float)
    assert parse("2e-4") == 2e-4
    for bad in ("0", "-1", "abc"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
