"""The offline phantoms (tools.phantoms) and the synthetic-anomaly preview figures (tools.preview)."""

from __future__ import annotations

import socket

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg
import numpy as np
import pytest

from tools import phantoms
from tools.phantoms import brain_partner, ct_phantom, mni152_brain
from tools.preview import main, write_previews

SIZE = 48
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _check_png(path):
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 300 and image.shape[1] > 300
    rgb = image[..., :3]
    assert float(rgb.std()) > 0.05  # not a blank figure
    assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50  # grey images, a colour map and text
    assert path.stat().st_size < 250_000


def test_write_previews(tmp_path, capsys):
    tasks = ("fpi", "sink")
    paths = write_previews(tmp_path, size=SIZE, seed=0, datasets=("brain", "abdom"), tasks=tasks)
    expected = [tmp_path / f"preview_{d}_{t}.png" for d in ("brain", "abdom") for t in tasks]
    assert paths == expected
    for path in paths:
        _check_png(path)
    printed = capsys.readouterr().out
    assert all(str(path) in printed for path in paths)


def test_preview_cli(tmp_path):
    paths = main(["--output_dir", str(tmp_path / "out"), "--size", str(SIZE), "--seed", "3",
                  "--datasets", "abdom", "--tasks", "poisson_inter"])
    assert paths == [tmp_path / "out" / "preview_abdom_poisson_inter.png"]
    _check_png(paths[0])


def test_write_previews_rejects_unknown_task(tmp_path):
    with pytest.raises(ValueError, match="unknown tasks"):
        write_previews(tmp_path, size=SIZE, tasks=("no_such_task",))


def test_mni152_brain_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("mni152_brain tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    phantoms._mni152_cached.cache_clear()
    volume, fg = mni152_brain(SIZE)
    assert volume.shape == (SIZE,) * 3 and volume.dtype == np.float32
    assert fg.shape == (SIZE,) * 3 and fg.dtype == bool
    assert 0 < fg.sum() < fg.size
    assert 0.15 < fg.mean() < 0.6
    assert abs(float(volume[fg].mean())) < 1e-3
    assert abs(float(volume[fg].std()) - 1.0) < 1e-3
    # the background is one constant, the minimum
    assert np.all(volume[~fg] == volume.min())
    # the brain is roughly centred and fills the cube's extent along its longest (anterior-posterior) axis
    coords = np.nonzero(fg)
    extent = [int(c.max() - c.min() + 1) for c in coords]
    assert extent[1] >= 0.85 * SIZE
    # callers get copies: mutating one does not change the next
    volume[:] = 0
    assert float(mni152_brain(SIZE)[0].std()) > 0.5


def test_brain_partner():
    volume, fg = mni152_brain(SIZE)
    a, fa = brain_partner(volume, fg, seed=1)
    b, fb = brain_partner(volume, fg, seed=1)
    c, _ = brain_partner(volume, fg, seed=2)
    assert a.shape == volume.shape and a.dtype == np.float32 and fa.dtype == bool
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(fa, fb)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, volume)
    assert abs(float(a[fa].mean())) < 1e-3 and abs(float(a[fa].std()) - 1.0) < 1e-3
    assert np.all(a[~fa] == a.min())
    # a deformation of a few voxels: the masks still overlap well, the images correlate
    dice = 2.0 * (fa & fg).sum() / (fa.sum() + fg.sum())
    assert 0.8 < dice < 1.0
    both = fa & fg
    assert np.corrcoef(a[both], volume[both])[0, 1] > 0.5


def test_ct_phantom():
    volume, body = ct_phantom(SIZE, seed=0)
    again, body_again = ct_phantom(SIZE, seed=0)
    other, body_other = ct_phantom(SIZE, seed=1)
    assert volume.shape == (SIZE,) * 3 and volume.dtype == np.float32
    assert body.shape == (SIZE,) * 3 and body.dtype == bool
    assert 0 < body.sum() < body.size
    np.testing.assert_array_equal(volume, again)
    np.testing.assert_array_equal(body, body_again)
    assert not np.array_equal(volume, other)
    assert not np.array_equal(body, body_other)
    # air around the body, one constant; plausible Hounsfield units inside
    assert np.all(volume[~body] == -1000.0)
    assert volume.min() >= -1000.0 and volume.max() <= 1500.0
    inside = volume[body]
    air, fat, soft, bone = np.percentile(inside, [0.1, 5, 75, 99.7])
    assert air < -500.0  # bowel gas
    assert -160.0 < fat < -50.0
    assert 0.0 < soft < 100.0
    assert bone > 300.0
    assert air < fat < soft < bone


def test_ct_phantom_at_working_size():
    volume, body = ct_phantom(128, seed=5)
    assert volume.shape == (128,) * 3 and 0.2 < body.mean() < 0.7
