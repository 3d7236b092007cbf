"""modelport/protocol/wire.py in-process, no sockets: the ZeroMQ frame layout. A tensor survives
the trip (msgpack included) for every dtype the wire names, bit for bit; an error comes back as its
own class with its message, input and retry time; a malformed tensor is refused with a BadInput
that names the tensor, before anything is allocated from its declared shape."""

from __future__ import annotations

import numpy as np
import pytest

from modelport import errors
from modelport.protocol import wire

CODES = ["?", "u1", "u2", "u4", "u8", "i1", "i2", "i4", "i8", "f2", "f4", "f8"]


def sample(code: str, shape=(2, 3, 4)) -> np.ndarray:
    """Values that use the whole type: extremes, and for floats negative zero and subnormals."""
    dtype = np.dtype(code)
    count = int(np.prod(shape))
    if dtype.kind == "b":
        values = np.arange(count) % 3 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.random.default_rng(0).integers(info.min, info.max, size=count, dtype=dtype, endpoint=True)
        values[:2] = info.min, info.max
    else:
        info = np.finfo(dtype)
        values = np.random.default_rng(0).normal(size=count).astype(dtype)
        values[:4] = info.min, info.max, -0.0, info.smallest_subnormal
    return values.astype(dtype).reshape(shape)


def through_a_frame(message: dict) -> dict:
    return wire.unpack(wire.pack(message))


@pytest.mark.parametrize("code", CODES)
def test_a_tensor_of_each_dtype_comes_back_bit_for_bit(code):
    array = sample(code)
    value = wire.tensor_to_wire(array)
    assert value["dtype"] == np.dtype(code).str.lstrip("<>=|") and value["shape"] == [2, 3, 4]
    back = wire.tensor_from_wire(through_a_frame({"t": value})["t"], "t")
    assert back.dtype == array.dtype and back.shape == array.shape
    assert back.tobytes() == array.tobytes()  # bit for bit: -0.0 and subnormals too


@pytest.mark.parametrize("code", ["u2", "i4", "f4", "f8"])
def test_the_wire_carries_little_endian_bytes(code):
    array = sample(code, (5,))
    assert wire.tensor_to_wire(array)["data"] == array.astype(np.dtype(code).newbyteorder("<")).tobytes()


def test_a_tensor_given_by_its_full_dtype_name_is_read_too():
    array = sample("f4", (2, 2))
    value = {"dtype": "float32", "shape": [2, 2], "data": array.astype("<f4").tobytes()}
    assert np.array_equal(wire.tensor_from_wire(value, "t"), array)


def test_a_non_contiguous_array_travels_as_its_values():
    array = np.arange(24, dtype=np.float32).reshape(4, 6)[::2, ::3]
    back = wire.tensor_from_wire(wire.tensor_to_wire(array), "t")
    assert np.array_equal(back, array) and back.shape == (2, 2)


def test_a_zero_dimensional_value_travels_as_one_element_and_an_empty_batch_keeps_its_shape():
    # Wire shapes have 1 to 32 dimensions: a scalar goes as a vector of one.
    scalar = wire.tensor_from_wire(wire.tensor_to_wire(np.array(3.5, dtype=np.float32)), "t")
    assert scalar.shape == (1,) and scalar[0] == 3.5
    empty = np.zeros((0, 3), np.uint8)
    back = wire.tensor_from_wire(wire.tensor_to_wire(empty), "t")
    assert back.shape == (0, 3) and back.dtype == np.uint8


def test_a_big_endian_array_is_sent_as_little_endian_and_read_back():
    array = np.arange(6, dtype=">f4").reshape(2, 3)
    back = wire.tensor_from_wire(wire.tensor_to_wire(array), "t")
    assert np.array_equal(back, array)


# -- malformed tensors -------------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (None, "must be a map with dtype, shape and data"),
    ([1, 2], "must be a map with dtype, shape and data"),
    (b"\x00" * 4, "must be a map with dtype, shape and data"),
    ({"shape": [1], "data": b"\x00" * 4}, "unknown dtype None"),
    ({"dtype": "c8", "shape": [1], "data": b"\x00" * 8}, "unknown dtype 'c8'"),
    ({"dtype": "O", "shape": [1], "data": b"\x00" * 8}, "unknown dtype 'O'"),
    ({"dtype": "<f4", "shape": [1], "data": b"\x00" * 4}, "unknown dtype '<f4'"),
    ({"dtype": "f4", "data": b"\x00" * 4}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [], "data": b""}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [-1], "data": b"\x00" * 4}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [True], "data": b"\x00" * 4}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [1.0], "data": b"\x00" * 4}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [1] * 33, "data": b"\x00" * 4}, "shape must be a list of 1 to 32"),
    ({"dtype": "f4", "shape": [1]}, "data must be bytes"),
    ({"dtype": "f4", "shape": [1], "data": "abcd"}, "data must be bytes"),
    ({"dtype": "f4", "shape": [1], "data": [0, 0, 0, 0]}, "data must be bytes"),
    ({"dtype": "f4", "shape": [2], "data": b"\x00" * 7}, "shape (2,) of float32 needs 8 bytes, got 7"),
    ({"dtype": "f4", "shape": [2], "data": b"\x00" * 9}, "shape (2,) of float32 needs 8 bytes, got 9"),
    ({"dtype": "u1", "shape": [0], "data": b"\x00"}, "needs 0 bytes, got 1"),
])
def test_a_malformed_tensor_is_refused_with_a_bad_input_that_names_it(value, expected):
    with pytest.raises(errors.BadInput) as caught:
        wire.tensor_from_wire(value, "image")
    assert expected in caught.value.message and "'image'" in caught.value.message
    assert caught.value.input_name == "image" and caught.value.status == 400


def test_a_huge_declared_shape_is_refused_by_its_byte_count_without_allocating():
    huge = {"dtype": "f8", "shape": [2 ** 62, 2 ** 62, 2 ** 62], "data": b"\x00" * 8}
    with pytest.raises(errors.BadInput, match=r"needs \d+ bytes, got 8"):
        wire.tensor_from_wire(huge, "image")


def test_the_shape_boundary_is_32_dimensions():
    assert wire.tensor_from_wire({"dtype": "u1", "shape": [1] * 32, "data": b"\x07"}, "t").ndim == 32
    with pytest.raises(errors.BadInput):
        wire.tensor_from_wire({"dtype": "u1", "shape": [1] * 33, "data": b"\x07"}, "t")


# -- errors ------------------------------------------------------------------------------------------

# The kinds the wire names (the module docstring): each comes back as its own class.
ON_THE_WIRE = [errors.BadInput, errors.NotFound, errors.PayloadTooLarge, errors.DeadlineExceeded,
               errors.ModelportError]
RETRY_LATER = [errors.Overloaded, errors.Unavailable]
# errors.py: "a client maps [kind] back to this class"; the wire's table lacks these four.
NOT_MAPPED_BACK = [errors.Unauthorized, errors.Forbidden, errors.BundleError, errors.MissingExtra]


@pytest.mark.parametrize("cls", ON_THE_WIRE)
def test_an_error_comes_back_as_its_own_class_with_message_and_input(cls):
    sent = cls("the model has no input 'pixels'", input_name="pixels")
    value = wire.error_to_wire(sent)
    assert value == {"kind": cls.kind, "status": cls.status, "message": "the model has no input 'pixels'",
                     "input": "pixels"}
    back = wire.error_from_wire(through_a_frame({"error": value})["error"])
    assert type(back) is cls
    assert (back.message, back.input_name, back.status, back.kind) == (sent.message, "pixels", cls.status, cls.kind)


@pytest.mark.parametrize("cls", ON_THE_WIRE)
def test_an_error_without_an_input_sends_none(cls):
    value = wire.error_to_wire(cls("no"))
    assert "input" not in value and "retry_after_s" not in value
    assert wire.error_from_wire(value).input_name is None


@pytest.mark.parametrize("cls", RETRY_LATER)
def test_a_retry_later_error_comes_back_with_its_retry_time(cls):
    value = wire.error_to_wire(cls("queue full (8 requests waiting)", retry_after_s=2.5))
    assert value == {"kind": cls.kind, "status": 503, "message": "queue full (8 requests waiting)",
                     "retry_after_s": 2.5}
    back = wire.error_from_wire(through_a_frame({"error": value})["error"])
    assert type(back) is cls and back.retry_after_s == 2.5 and back.message == value["message"]
    assert back.headers() == {"Retry-After": "2"}


@pytest.mark.parametrize("cls", RETRY_LATER)
def test_a_retry_later_error_without_a_retry_time_waits_one_second(cls):
    back = wire.error_from_wire({"kind": cls.kind, "message": "later"})
    assert type(back) is cls and back.retry_after_s == 1.0


@pytest.mark.parametrize("cls", NOT_MAPPED_BACK)
def test_every_error_kind_of_errors_py_comes_back_as_its_own_class(cls):
    back = wire.error_from_wire(wire.error_to_wire(cls("no")))
    assert type(back) is cls


@pytest.mark.parametrize("cls", NOT_MAPPED_BACK)
def test_an_error_kind_the_wire_does_not_name_still_keeps_its_message(cls):
    back = wire.error_from_wire(wire.error_to_wire(cls("bundle /x: missing model.onnx")))
    assert isinstance(back, errors.ModelportError) and back.message == "bundle /x: missing model.onnx"


@pytest.mark.parametrize("kind", ["no_such_kind", None, 7, ""])
def test_an_unknown_error_kind_is_an_internal_error_with_its_message(kind):
    back = wire.error_from_wire({"kind": kind, "status": 418, "message": "teapot"})
    assert type(back) is errors.ModelportError and back.message == "teapot" and back.status == 500


@pytest.mark.parametrize("error", [None, "boom", 17, [1, 2]])
def test_an_error_reply_that_is_not_a_map_is_reported_as_malformed(error):
    back = wire.error_from_wire(error)
    assert type(back) is errors.ModelportError and back.message.startswith("malformed error reply")


def test_an_error_reply_without_a_message_still_says_error():
    assert wire.error_from_wire({"kind": "not_found"}).message == "error"


# -- frames ------------------------------------------------------------------------------------------

def test_a_frame_keeps_bytes_as_bytes_and_text_as_text_and_integer_keys():
    message = {"id": 17, "op": "classify", "images": [b"\xff\xd8jpeg"], "model": "m", 3: "three"}
    assert wire.unpack(wire.pack(message)) == message


def test_bytes_that_are_not_msgpack_raise_on_unpack():
    with pytest.raises(ValueError):  # the server answers these with bad_input (rpc.py)
        wire.unpack(b"\xc1")  # a byte msgpack never uses
