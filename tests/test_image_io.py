"""Image files: the grids people look at (upscaled, bordered) and the uint8 conversion."""

import numpy as np

from consistency.io import image_io


def test_grid_of_8x8_digits_is_at_least_512_px_wide_with_borders():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8)
    grid = image_io.image_grid(images)
    rows, cols, scale = image_io.grid_geometry(64, 8, 8)
    assert (rows, cols, scale) == (8, 8, 8)
    assert grid.shape == (8 * 66 + 2, 8 * 66 + 2, 1) and grid.shape[1] >= 512
    b, v = image_io.GRID_BORDER, image_io.GRID_BORDER_VALUE
    # The borders: the first and last lines, and the lines between the images.
    assert np.all(grid[:b] == v) and np.all(grid[-b:] == v)
    assert np.all(grid[:, :b] == v) and np.all(grid[:, 66 : 66 + b] == v)
    # Image k sits in its cell, each pixel a scale x scale block.
    for k in (0, 9, 63):
        r, q = divmod(k, 8)
        cell = grid[b + r * 66 : b + r * 66 + 64, b + q * 66 : b + q * 66 + 64]
        np.testing.assert_array_equal(cell, images[k].repeat(8, 0).repeat(8, 1))


def test_grid_of_large_images_is_not_upscaled_and_fills_missing_cells_grey():
    images = np.zeros((5, 300, 200, 3), np.uint8)
    grid = image_io.image_grid(images, ncols=3)
    assert image_io.grid_geometry(5, 300, 200, 3) == (2, 3, 1)
    assert grid.shape == (2 * 302 + 2, 3 * 202 + 2, 3)
    assert np.all(grid[304:604, 406:606] == image_io.GRID_BORDER_VALUE)  # the sixth, empty cell
    assert np.all(grid[2:302, 2:202] == 0)


def test_to_uint8_rounds_as_the_references():
    x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    np.testing.assert_array_equal(image_io.to_uint8(x), [0, 0, 128, 191, 255, 255])
