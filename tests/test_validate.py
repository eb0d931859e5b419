"""ppvae._validate: declarative constraints, their messages, and the argparse types built from them."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from ppvae._validate import COUNT, NONNEGATIVE, POSITIVE, SEED, Interval, Options, arg_type, check, check_seed
from ppvae.cli.args import count_arg, seed_arg
from ppvae.errors import ConfigError


@pytest.mark.parametrize("value", [1, 7, np.int64(3), np.uint8(200)])
def test_count_accepts_whole_numbers_and_returns_python_ints(value):
    out = check("epochs", value, COUNT)
    assert out == int(value) and type(out) is int


@pytest.mark.parametrize("value", [0, -1, 1.0, 2.5, True, np.bool_(True), "3", None, float("nan")])
def test_count_refuses_with_the_value_and_what_was_expected(value):
    with pytest.raises(ConfigError) as err:
        check("epochs", value, COUNT)
    assert str(err.value) == f"epochs must be a whole number ≥ 1, got {value!r}"


def test_real_intervals_open_and_closed_ends():
    assert check("lr", 1e-3, POSITIVE) == 1e-3 and type(check("lr", 2, POSITIVE)) is float
    with pytest.raises(ConfigError, match=r"lr must be a number > 0, got 0"):
        check("lr", 0, POSITIVE)
    assert check("beta", 0, NONNEGATIVE) == 0.0
    for bad in (float("inf"), float("nan"), -0.1):
        with pytest.raises(ConfigError, match="beta must be a number ≥ 0"):
            check("beta", bad, NONNEGATIVE)
    unit = Interval(whole=False, low=0, high=1, high_open=True)
    assert check("p", 0.0, unit) == 0.0
    with pytest.raises(ConfigError, match=r"p must be a number in \[0, 1\), got 1"):
        check("p", 1, unit)


def test_none_and_options_are_alternatives():
    assert check("patience", None, None, COUNT) is None
    assert check("patience", 4, None, COUNT) == 4
    with pytest.raises(ConfigError, match=r"patience must be None or a whole number ≥ 1, got 0"):
        check("patience", 0, None, COUNT)
    policy = Options(("raise", "skip"))
    assert check("on_nonfinite", "skip", policy) == "skip"
    with pytest.raises(ConfigError, match=r"on_nonfinite must be one of 'raise', 'skip', got 'ignore'"):
        check("on_nonfinite", "ignore", policy)
    assert not Options((1,)).accepts(True)  # True == 1 in Python, but a bool is not the option 1


def test_seeds_span_numpys_range():
    assert check_seed(0) == 0 and check_seed(2**32 - 1) == 2**32 - 1
    for bad in (-1, 2**32, 1.5, "0"):
        with pytest.raises(ConfigError, match=r"seed must be a whole number in \[0, 2\*\*32 - 1\]"):
            check_seed(bad)
    assert SEED.accepts(np.int32(5))


def test_argparse_types_share_the_library_messages():
    assert seed_arg("12") == 12 and count_arg("epochs")("3") == 3
    with pytest.raises(argparse.ArgumentTypeError, match="epochs must be a whole number ≥ 1, got 0"):
        count_arg("epochs")("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"'x' is not a whole number ≥ 1"):
        count_arg("epochs")("x")
    with pytest.raises(argparse.ArgumentTypeError, match=r"seed must be a whole number in \[0, 2\*\*32 - 1\]"):
        seed_arg("-1")
    rate = arg_type("lr", POSITIVE, parse=float)
    assert rate("0.5") == 0.5
    with pytest.raises(argparse.ArgumentTypeError, match="lr must be a number > 0, got -1.0"):
        rate("-1")
