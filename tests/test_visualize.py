"""The pictures: a labelled confusion matrix, panels at a readable size with a legend, error maps."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from segvoc.palette import class_palette, default_class_names
from segvoc.visualize import confusion_image, diagnostic_panel, error_map, font, with_legend

NAMES = default_class_names(21)


def ink(region: np.ndarray, background: tuple[int, int, int]) -> int:
    """The pixels of ``region`` that differ from ``background``: drawn text or lines."""
    return int((np.abs(region.astype(int) - np.array(background)).sum(axis=2) > 60).sum())


def test_confusion_matrix_has_names_on_both_axes_and_values_in_the_cells_that_matter() -> None:
    confmat = torch.zeros(21, 21, dtype=torch.long)
    confmat[9, 9], confmat[9, 0] = 690, 310  # chair: 69 % right, 31 % taken for background
    confmat[0, 0], confmat[0, 5] = 99_999, 1  # background: a 0.001 % confusion, below the 1 % shown
    cell = 30
    picture = confusion_image(confmat, NAMES, cell=cell)
    label = int(max(font(cell * 2 // 5).getlength(name) for name in NAMES)) + 10
    assert picture.shape == (label + 21 * cell + 4, label + 21 * cell + 4, 3)  # square grid plus the name margins

    def cell_of(i: int, j: int) -> np.ndarray:  # inside the borders
        return picture[
            label + i * cell + 2 : label + (i + 1) * cell - 1, label + j * cell + 2 : label + (j + 1) * cell - 1
        ]

    # rows normalised: 31 % of chair is light blue with dark digits; 69 % dark blue with white digits
    light, dark = cell_of(9, 0), cell_of(9, 9)
    assert ink(light, tuple(light[0, 0])) > 10 and ink(dark, tuple(dark[0, 0])) > 10
    expected = np.round(255 + (np.array([8, 48, 107]) - 255) * 0.31)  # white (0) to dark blue (1)
    assert light[0, 0].tolist() == expected.tolist()
    assert ink(cell_of(0, 5), (255, 255, 255)) == 0  # too small to matter: blank
    assert ink(cell_of(3, 3), (255, 255, 255)) == 0  # a class absent from the truth: a blank row
    # the names: "chair" written left of row 9, and (turned) above column 9, in the same ink as rendered alone
    row_label = picture[label + 9 * cell : label + 10 * cell, :label]
    column_label = picture[:label, label + 9 * cell : label + 10 * cell]
    alone = Image.new("RGB", (label, cell), (255, 255, 255))
    ImageDraw.Draw(alone).text((label - 5, cell // 2), "chair", fill=(0, 0, 0), font=font(cell * 2 // 5), anchor="rm")
    assert ink(row_label, (255, 255, 255)) == ink(np.asarray(alone), (255, 255, 255)) > 20
    assert abs(ink(column_label, (255, 255, 255)) - ink(row_label, (255, 255, 255))) <= 4
    assert ink(picture[label + 3 * cell : label + 4 * cell, :label], (255, 255, 255)) > 0  # every row is named


def test_panel_legend_names_the_classes_present_at_a_readable_size() -> None:
    picture = np.zeros((60, 200, 3), dtype=np.uint8)
    out = with_legend(picture, [0, 15], NAMES, min_height=256)
    assert out.shape[1] == 200 * 5 and out.shape[0] > 60 * 5  # enlarged 5x (60 -> 300 >= 256), legend below
    assert np.array_equal(out[:300:5, ::5], picture)  # nearest neighbour: the masks keep their exact colours
    legend = out[300:]
    person = class_palette(21)[15]
    assert (legend == person).all(axis=2).sum() >= 100  # the person swatch
    assert (legend == [0, 0, 0]).all(axis=2).sum() > 100  # the background swatch and the text
    more = with_legend(picture, list(range(21)), NAMES, min_height=256)
    assert more.shape[0] > out.shape[0]  # 21 names wrap onto more lines of the same width
    assert more.shape[1] == out.shape[1]


def test_diagnostic_panel_marks_exactly_the_wrong_pixels() -> None:
    image = np.full((40, 50, 3), 128, dtype=np.uint8)
    truth = np.zeros((40, 50), dtype=np.uint8)
    truth[10:20, 10:20] = 15
    truth[0, :] = 255
    pred = truth.copy()
    pred[10:15, 10:20] = 0  # 50 person pixels missed
    pred[0, :] = 3  # ignored: never an error
    errors = error_map(image, truth, pred)
    assert (errors == [230, 30, 30]).all(axis=2).sum() == 50
    picture = diagnostic_panel(image, truth, pred, NAMES)
    factor = -(-256 // 40)
    assert picture.shape[1] == 4 * 50 * factor and picture.shape[0] > 40 * factor
