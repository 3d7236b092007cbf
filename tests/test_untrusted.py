"""modelport/untrusted.py in-process: each function turns an untrusted value into a typed one or
refuses it with a BadInput that names the field; the traps the module names (non-ASCII digits,
thousands of digits, NaN and Infinity, too many dimensions, arbitrary dtype strings) are closed,
and limits hold as boundary pairs (just under / just over)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modelport import untrusted
from modelport.errors import BadInput

NON_ASCII_DIGITS = ["²", "١٢", "٣", "１２", "߁"]  # str.isdigit() says yes to each; int() refuses most


def refused(function, *args, **kwargs) -> BadInput:
    with pytest.raises(BadInput) as caught:
        function(*args, **kwargs)
    return caught.value


# -- ascii_digits ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["0", "7", "123", "9" * untrusted.MAX_DIGITS])
def test_ascii_digits_accepts_up_to_max_digits_of_0_to_9(text):
    assert untrusted.ascii_digits(text)


@pytest.mark.parametrize("text", ["", "9" * (untrusted.MAX_DIGITS + 1), "-1", "+1", " 1", "1 ", "1.0", "1e3", "0x1",
                                  *NON_ASCII_DIGITS])
def test_ascii_digits_refuses_empty_signed_spaced_too_long_and_non_ascii_digits(text):
    assert not untrusted.ascii_digits(text)


# -- integer -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(0, 0), (5, 5), ("5", 5), ("007", 7), ("9" * 18, 10 ** 18 - 1)])
def test_integer_accepts_numbers_and_ascii_digit_strings(value, expected):
    got = untrusted.integer(value, "top_k")
    assert got == expected and type(got) is int


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, float("nan"), float("inf"), None, [1], {"n": 1}, b"1"])
def test_integer_refuses_bools_floats_and_other_types(value):
    error = refused(untrusted.integer, value, "top_k")
    assert error.message.startswith("top_k must be an integer at least 0")


@pytest.mark.parametrize("text", NON_ASCII_DIGITS + ["", " 3", "3 ", "+3", "-3", "3.0", "1_000", "9" * 19, "9" * 5000])
def test_integer_refuses_strings_that_are_not_at_most_18_ascii_digits(text):
    error = refused(untrusted.integer, text, "top_k")
    assert "top_k must be an integer" in error.message


def test_integer_keeps_its_bounds_as_a_boundary_pair():
    assert untrusted.integer(1, "k", minimum=1, maximum=10) == 1
    assert untrusted.integer(10, "k", minimum=1, maximum=10) == 10
    assert untrusted.integer("10", "k", minimum=1, maximum=10) == 10
    assert "from 1 to 10, got 0" in refused(untrusted.integer, 0, "k", minimum=1, maximum=10).message
    assert "from 1 to 10, got 11" in refused(untrusted.integer, 11, "k", minimum=1, maximum=10).message
    assert "at least 1, got 0" in refused(untrusted.integer, 0, "k", minimum=1).message


def test_integer_refuses_a_negative_number_below_zero_and_a_minus_sign_in_a_string():
    assert untrusted.integer(-3, "offset", minimum=-5) == -3
    refused(untrusted.integer, -1, "offset")
    refused(untrusted.integer, "-3", "offset", minimum=-5)  # digits only: no sign in a string


def test_integer_names_the_input_the_value_came_from():
    assert refused(untrusted.integer, "x", "binary_data_size", input_name="image").input_name == "image"


def test_integer_shows_a_huge_refused_number_without_echoing_its_digits():
    error = refused(untrusted.integer, 10 ** 400, "k", maximum=10)
    assert "an integer too large" in error.message and "0000000000" not in error.message


def test_optional_integer_is_none_for_none_and_checked_otherwise():
    assert untrusted.optional_integer(None, "k", minimum=1) is None
    assert untrusted.optional_integer("3", "k", minimum=1) == 3
    refused(untrusted.optional_integer, 0, "k", minimum=1)
    refused(untrusted.optional_integer, "", "k", minimum=1)


# -- positive_number ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [(1, 1.0), (0.5, 0.5), ("250", 250.0), ("1e3", 1000.0), ("0.001", 0.001),
                                             (5e-324, 5e-324)])
def test_positive_number_accepts_finite_numbers_above_zero_and_numeric_strings(value, expected):
    got = untrusted.positive_number(value, "timeout_ms")
    assert got == expected and type(got) is float


@pytest.mark.parametrize("value", [0, 0.0, -1, "-1", "0", float("nan"), float("inf"), float("-inf"), "nan", "NaN",
                                   "inf", "Infinity", "1e999", True, False, None, [1], b"1"])
def test_positive_number_refuses_zero_negatives_nan_infinity_and_bools(value):
    assert refused(untrusted.positive_number, value, "timeout_ms").message.startswith("timeout_ms must be")


@pytest.mark.parametrize("text", ["", "soon", "1,5", "0x10", "1 s"])
def test_positive_number_refuses_text_that_is_not_a_number(text):
    assert "timeout_ms must be a number" in refused(untrusted.positive_number, text, "timeout_ms").message


def test_positive_number_refuses_an_integer_too_large_for_a_float():
    refused(untrusted.positive_number, 10 ** 400, "timeout_ms")


# -- version -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [None, ""])
def test_version_none_or_empty_means_the_latest(value):
    assert untrusted.version(value) is None


@pytest.mark.parametrize("value, expected", [(0, 0), (3, 3), ("3", 3), ("0012", 12), ("stable", "stable"),
                                             ("v2", "v2"), ("x" * untrusted.MAX_LABEL_CHARS, "x" * 128)])
def test_version_is_a_number_from_ascii_digits_or_else_a_label(value, expected):
    assert untrusted.version(value) == expected
    assert type(untrusted.version(value)) is type(expected)


@pytest.mark.parametrize("text", NON_ASCII_DIGITS)
def test_version_of_non_ascii_digits_is_a_label_not_a_number(text):
    # A label, which the routing table then checks as a name (and refuses: see test_routing.py).
    assert untrusted.version(text) == text


@pytest.mark.parametrize("value", [True, False, 1.0, float("nan"), -1, [1], {"v": 1}, b"1",
                                   "x" * (untrusted.MAX_LABEL_CHARS + 1), "9" * 19])
def test_version_refuses_bools_floats_negatives_and_overlong_values(value):
    assert "version" in refused(untrusted.version, value).message


def test_version_names_its_field():
    assert refused(untrusted.version, 1.5, "model_version").message.startswith("model_version must be")


# -- mapping, flag, string ---------------------------------------------------------------------------

def test_mapping_is_empty_when_absent_and_refuses_anything_but_an_object():
    assert untrusted.mapping(None, "parameters") == {}
    assert untrusted.mapping({"a": 1}, "parameters") == {"a": 1}
    for value in ([], "x", 1, True):
        error = refused(untrusted.mapping, value, "parameters", input_name="image")
        assert "parameters must be an object" in error.message and error.input_name == "image"


def test_flag_takes_only_true_false_or_the_default():
    assert untrusted.flag(None, "binary_data") is False
    assert untrusted.flag(None, "binary_data", default=True) is True
    assert untrusted.flag(True, "binary_data") is True and untrusted.flag(False, "binary_data", True) is False
    for value in (1, 0, "true", "false", "", [], 1.0):
        assert "binary_data must be true or false" in refused(untrusted.flag, value, "binary_data").message


def test_string_keeps_its_length_limit_as_a_boundary_pair():
    assert untrusted.string("x" * 128, "name") == "x" * 128
    assert untrusted.string("", "name") == ""
    assert untrusted.string("é" * 10, "name", max_chars=10) == "é" * 10
    refused(untrusted.string, "x" * 129, "name")
    refused(untrusted.string, "x" * 11, "name", max_chars=10)
    for value in (None, 1, b"x", ["x"]):
        assert refused(untrusted.string, value, "name", input_name="i").input_name == "i"


# -- request_id --------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["", "abc", "é", 0, -1, 2 ** 63 - 1, -(2 ** 63) + 1])
def test_request_id_is_echoed_as_a_string_or_an_int64(value):
    assert untrusted.request_id(value) == value


@pytest.mark.parametrize("value", [2 ** 63, -(2 ** 64), 10 ** 400, 1.0, float("nan"), True, None, [1], b"id"])
def test_request_id_refuses_floats_bools_and_integers_past_int64(value):
    error = refused(untrusted.request_id, value)
    assert "id must be a string or an integer" in error.message and len(error.message) < 120


# -- shape -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [[1], (2, 3), [0], [0, 224, 224, 3], [1] * untrusted.MAX_DIMS, [2 ** 63 - 1]])
def test_shape_accepts_1_to_32_non_negative_integers(value):
    assert untrusted.shape(value, "shape") == tuple(value)


@pytest.mark.parametrize("value", [[], [1] * (untrusted.MAX_DIMS + 1), [-1], [1, -2], [True], [1, False], [1.0],
                                   ["3"], [2 ** 63], None, "12", 3, {"0": 1}, [[1]]])
def test_shape_refuses_empty_too_many_dims_negatives_bools_and_non_integers(value):
    error = refused(untrusted.shape, value, "tensor 'x': shape", input_name="x")
    assert "must be a list of 1 to 32 non-negative integers" in error.message and error.input_name == "x"


def test_shape_of_a_huge_product_is_accepted_without_allocating_it():
    # 2^62 x 2^62 elements: the product is the caller's to check against the bytes it got.
    assert untrusted.shape([2 ** 62, 2 ** 62], "shape") == (2 ** 62, 2 ** 62)


# -- dtype -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("code", ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"])
def test_dtype_accepts_numpy_short_codes_and_full_names(code):
    dtype = np.dtype(code)
    short = dtype.str.lstrip("<>=|")
    assert untrusted.dtype(short, "t") == dtype and untrusted.dtype(dtype.name, "t") == dtype
    assert untrusted.dtype(short, "t").isnative


@pytest.mark.parametrize("value", ["<f4", ">f4", "=f4", "|u1", "O", "object", "U10", "S4", "c8", "complex64", "V8",
                                   "datetime64", "f4,f4", "FP32", "", None, 4, np.float32])
def test_dtype_refuses_byte_orders_objects_strings_complex_and_non_names(value):
    error = refused(untrusted.dtype, value, "tensor 'x'", input_name="x")
    assert "unknown dtype" in error.message and "float32" in error.message and error.input_name == "x"


# -- content_length ----------------------------------------------------------------------------------

def test_content_length_keeps_its_limit_as_a_boundary_pair():
    assert untrusted.content_length("0", "Content-Length", 100) == 0
    assert untrusted.content_length("100", "Content-Length", 100) == 100
    assert "from 0 to 100" in refused(untrusted.content_length, "101", "Content-Length", 100).message


@pytest.mark.parametrize("raw", ["", "-1", "+5", " 5", "5.0", "1e2", "0x10", "9" * 19, *NON_ASCII_DIGITS])
def test_content_length_refuses_anything_but_ascii_digits(raw):
    refused(untrusted.content_length, raw, "Content-Length", 10 ** 18)


# -- json_body ---------------------------------------------------------------------------------------

def test_json_body_parses_standard_json():
    assert untrusted.json_body(b'{"inputs": [{"shape": [1, 2], "data": [1.5, -2]}]}') == {
        "inputs": [{"shape": [1, 2], "data": [1.5, -2]}]}
    assert untrusted.json_body('{"name": "é"}'.encode()) == {"name": "é"}


@pytest.mark.parametrize("body", [b"NaN", b"[Infinity]", b'{"x": -Infinity}', b'{"data": [1, NaN]}'])
def test_json_body_refuses_nan_and_infinity(body):
    error = refused(untrusted.json_body, body)
    assert "is not a JSON number" in error.message and error.message.startswith("request body: not valid JSON")


def test_json_body_leaves_a_number_beyond_float_range_to_the_field_check():
    # 1e999 is standard JSON syntax: it parses as infinity, which the field's own check refuses.
    value = untrusted.json_body(b'{"timeout": 1e999}')["timeout"]
    assert math.isinf(value)
    refused(untrusted.positive_number, value, "timeout")


@pytest.mark.parametrize("body", [b"", b"{", b"[1,]", b"{'a': 1}", b"\xff\xfe\xfd", b"1" * 5000])
def test_json_body_refuses_malformed_bytes_and_numbers_of_thousands_of_digits(body):
    assert refused(untrusted.json_body, body, "inputs").message.startswith("inputs: not valid JSON")


def test_json_body_refuses_deep_nesting_with_a_clear_message():
    depth = 100_000
    error = refused(untrusted.json_body, b"[" * depth + b"]" * depth)
    assert error.message == "request body: JSON nested too deeply"


def test_json_body_accepts_ordinary_nesting():
    assert untrusted.json_body(b"[" * 50 + b"]" * 50) is not None


# -- show --------------------------------------------------------------------------------------------

def test_show_cuts_long_values_and_never_prints_a_huge_integer():
    assert untrusted.show("x" * 100) == repr("x" * 100)[:40] + "..."
    assert untrusted.show("x" * 38) == repr("x" * 38)  # 40 characters with its quotes: whole
    assert untrusted.show(2 ** 64 - 1) == str(2 ** 64 - 1)
    assert untrusted.show(2 ** 64) == "an integer too large"
    assert untrusted.show(-(10 ** 5000)) == "an integer too large"
    assert untrusted.show(True) == "True" and untrusted.show(None) == "None"
