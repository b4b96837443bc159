"""The client's rule for image arrays: rank 2 is one grayscale image (H, W), rank 3 one image (H, W, C)
with C = 1, 3 or 4, rank 4 a batch (N, H, W, C); anything else is a ValueError that names the shape and
says how to send a batch. Labelled examples stay batches: (N, H, W[, C]) with N labels."""

from __future__ import annotations

import numpy as np
import pytest

from munet.client import add_requests, register_requests, to_images


def _shapes(images) -> list[tuple[int, int, int]]:
    return [(im.raw.height, im.raw.width, im.raw.channels) for im in to_images(images)]


@pytest.mark.parametrize(("shape", "expected"), [
    ((32, 32), [(32, 32, 1)]),                 # one grayscale image
    ((32, 32, 3), [(32, 32, 3)]),              # one RGB image: one prediction, not 32
    ((20, 30, 1), [(20, 30, 1)]),
    ((20, 30, 4), [(20, 30, 4)]),              # RGBA
    ((5, 8, 8, 1), [(8, 8, 1)] * 5),           # a grayscale batch
    ((2, 16, 12, 3), [(16, 12, 3)] * 2),       # an RGB batch
])
def test_array_ranks(shape, expected):
    assert _shapes(np.zeros(shape, np.uint8)) == expected


def test_lists_hold_one_image_per_item():
    gray = np.zeros((6, 8, 8), np.uint8)
    assert _shapes(list(gray)) == [(8, 8, 1)] * 6
    assert _shapes([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4), np.uint8)]) == [(8, 8, 3), (4, 4, 1)]
    assert _shapes(gray[..., None]) == [(8, 8, 1)] * 6


@pytest.mark.parametrize("shape", [(6, 8, 8), (32, 32, 2), (3, 32, 32), (4, 4, 4, 5), (8,), (1, 2, 8, 8, 3), ()])
def test_other_shapes_are_a_clear_error(shape):
    with pytest.raises(ValueError) as e:
        to_images(np.zeros(shape, np.uint8))
    message = str(e.value)
    assert str(shape) in message
    if len(shape) != 4:
        assert "(N, H, W, 1)" in message and "list" in message  # how to send a batch


def test_a_list_item_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\(6, 8, 8\)"):
        to_images([np.zeros((6, 8, 8), np.uint8)])


def test_float_pixels_keep_their_rule():
    assert _shapes(np.full((8, 8, 3), 0.5)) == [(8, 8, 3)]
    with pytest.raises(ValueError, match="uint8 or float in"):
        to_images(np.full((8, 8, 3), 7.0))


def test_labelled_examples_stay_batches():
    # (N, H, W) with N labels is unambiguous: N grayscale examples
    msgs = list(add_requests("t", np.zeros((6, 8, 8), np.uint8), [0, 1, 0, 1, 0, 1], chunk=4))
    assert [len(m.examples.examples) for m in msgs[:-1]] == [4, 2]
    assert msgs[-1].end.examples == 6
    assert {(e.image.raw.height, e.image.raw.width, e.image.raw.channels)
            for m in msgs[:-1] for e in m.examples.examples} == {(8, 8, 1)}
    msgs = list(register_requests("t", ["a", "b"], examples=(np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 1])))
    assert msgs[0].spec.name == "t" and len(msgs[1].examples.examples) == 3 and msgs[-1].end.examples == 3
    with pytest.raises(ValueError):
        add_requests("t", np.zeros((6, 8, 8), np.uint8), [0, 1])  # labels must match N, checked before sending


def test_http_arrays_follow_the_same_rule():
    from munet.errors import InvalidArgument
    from munet.service.rest import image_inputs

    [one] = image_inputs(None, [np.zeros((4, 5, 3), np.uint8).tolist()])
    assert (one.height, one.width, one.channels) == (4, 5, 3)
    with pytest.raises(InvalidArgument, match=r"\[6, 8, 8\].*one \(H, W\) or \(H, W, C\) array per image"):
        image_inputs(None, [np.zeros((6, 8, 8), np.uint8).tolist()])
