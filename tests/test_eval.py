"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from promptseg.errors import PromptsegError
from promptseg.eval import IGNORE_INDEX, ConfusionMatrix, ContextLeak, miou_from_arrays

# valid (target, pred) pairs: (0,0) (1,1) (1,2) (2,2) (0,1); the 255 pixel is ignored
TARGET = np.array([[0, 1, 1], [2, 255, 0]])
PRED = np.array([[0, 1, 2], [2, 1, 1]])
MATRIX = np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
IOU = np.array([1 / 2, 1 / 3, 1 / 2])  # tp / (row + col - tp)


def test_confusion_matrix_by_hand() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, MATRIX)
    assert cm.matrix.dtype == np.int64
    np.testing.assert_allclose(cm.iou(), IOU)
    assert cm.miou() == pytest.approx(4 / 9)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_accumulates_over_updates() -> None:
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    cm.update(PRED.astype(np.uint8), TARGET.astype(np.uint8))
    np.testing.assert_array_equal(cm.matrix, 2 * MATRIX)
    assert cm.miou() == pytest.approx(4 / 9)


def test_ignore_pixels_never_count() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([[2, 0]]), np.array([[IGNORE_INDEX, IGNORE_INDEX]]))
    assert cm.matrix.sum() == 0
    assert math.isnan(cm.miou()) and math.isnan(cm.pixel_accuracy())


def test_absent_class_is_nan_and_skipped() -> None:
    cm = ConfusionMatrix(4)  # class 3 appears in neither target nor prediction
    cm.update(PRED, TARGET)
    iou = cm.iou()
    np.testing.assert_allclose(iou[:3], IOU)
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(4 / 9)
    summary = cm.summary(["background", "a", "b", "c"])
    assert summary["miou"] == pytest.approx(4 / 9)
    assert summary["pixel_accuracy"] == pytest.approx(3 / 5)
    assert summary["per_class_iou"] == {
        "background": pytest.approx(0.5), "a": pytest.approx(1 / 3), "b": pytest.approx(0.5), "c": None
    }


def test_class_only_predicted_has_zero_iou() -> None:
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 2]), np.array([0, 0]))
    np.testing.assert_allclose(cm.iou()[[0, 2]], [0.5, 0.0])
    assert math.isnan(cm.iou()[1])
    assert cm.miou() == pytest.approx(0.25)


def test_miou_from_arrays() -> None:
    assert miou_from_arrays([PRED, PRED], [TARGET, TARGET], 3) == pytest.approx(4 / 9)


@pytest.mark.parametrize(
    ("pred", "target", "match"),
    [
        (np.zeros((2, 3), int), np.zeros((3, 2), int), r"pred shape \(2, 3\) vs target shape \(3, 2\)"),
        (np.array([0, 3]), np.array([0, 1]), r"pred ids \[3\] on non-ignored pixels \| expected 0\.\.2"),
        (np.array([0, 1]), np.array([0, 7]), r"target ids \[7\]"),
        (np.array([0.0, 1.0]), np.array([0, 1]), r"pred dtype float64"),
    ],
)
def test_confusion_matrix_rejects_bad_input(pred: np.ndarray, target: np.ndarray, match: str) -> None:
    with pytest.raises(PromptsegError, match=match):
        ConfusionMatrix(3).update(pred, target)


def test_summary_needs_one_name_per_class() -> None:
    with pytest.raises(PromptsegError, match="expected 3"):
        ConfusionMatrix(3).summary(["background", "a"])


# class 1: predicted at 4 pixels, 3 of them on context 1; class 2: 2 pixels, 1 on context 2
LEAK_PRED = np.array([[1, 1, 1, 0], [2, 2, 255, 1]])
LEAK_CONTEXT = np.array([[1, 1, 0, 1], [2, 0, 1, 1]])


def test_context_leak_by_hand() -> None:
    leak = ContextLeak(2)
    leak.update(LEAK_PRED, LEAK_CONTEXT)
    np.testing.assert_array_equal(leak.fg, [4, 2])
    np.testing.assert_array_equal(leak.leak, [3, 1])
    np.testing.assert_allclose(leak.per_class(), [3 / 4, 1 / 2])
    assert leak.overall() == pytest.approx(4 / 6)


def test_context_leak_labels_restrict_classes() -> None:
    leak = ContextLeak(2)
    leak.update(LEAK_PRED, LEAK_CONTEXT, labels=np.array([1.0, 0.0], dtype=np.float32))
    per_class = leak.per_class()
    assert per_class[0] == pytest.approx(3 / 4) and math.isnan(per_class[1])
    assert leak.overall() == pytest.approx(3 / 4)


def test_context_leak_empty_and_bad_input() -> None:
    leak = ContextLeak(2)
    leak.update(np.zeros((2, 2), int), np.ones((2, 2), int))
    assert leak.overall() == 0.0 and np.isnan(leak.per_class()).all()
    with pytest.raises(PromptsegError, match=r"pred ids \[3\]"):
        leak.update(np.array([3]), np.array([0]))
    with pytest.raises(PromptsegError, match="context shape"):
        leak.update(np.zeros((2, 2), int), np.zeros((2, 3), int))


def test_average_precision_hand_computed():
    from promptseg.eval import average_precision

    labels = np.array([1, 0, 1, 0])
    assert average_precision(np.array([0.9, 0.1, 0.8, 0.2]), labels) == 1.0
    # ranking 0.9(-) 0.8(+) 0.2(-) 0.1(+): positives at ranks 2 and 4, precisions 1/2 and 2/4
    assert average_precision(np.array([0.1, 0.9, 0.8, 0.2]), labels) == pytest.approx(0.5)
    # ranking 0.9(+) 0.5(-) 0.4(+): precisions 1 and 2/3
    assert average_precision(np.array([0.9, 0.5, 0.4]), np.array([1, 0, 1])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))
