"""Tests of metafit.datasets: Omniglot in both on-disk forms, protocol splits, digits."""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from _shared_data import SHARED_DATA

from metafit import datasets as D
from metafit.datasets import _png as P
from metafit.datasets import omniglot as O
from metafit.tasks import NWayKShotTasks

SHARED = SHARED_DATA
OMNI = SHARED / "omniglot"
needs_shared = pytest.mark.skipif(
    not (OMNI / "images_background.npz").is_file(),
    reason=f"shared Omniglot data absent ({OMNI})",
)


# ----------------------------------------------------------------------------- helpers


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", zlib.crc32(ctype + body))


def _png(levels: np.ndarray, depth: int = 1, filters=(0,)) -> bytes:
    """Encode gray levels (0..2**depth-1) as a grayscale PNG, cycling the row filters."""
    h, w = levels.shape
    if depth == 8:
        rows = levels.astype(np.uint8)
    else:
        shifts = np.arange(depth - 1, -1, -1)
        bits = ((levels[..., None].astype(np.uint8) >> shifts) & 1).reshape(h, w * depth)
        rows = np.packbits(bits.astype(np.uint8), axis=1)
    bpp = max(1, depth // 8)
    prev = np.zeros(rows.shape[1], dtype=np.int64)
    out = b""
    for r in range(h):
        f = filters[r % len(filters)]
        line = rows[r].astype(np.int64)
        a = np.concatenate([np.zeros(bpp, np.int64), line[:-bpp]])
        c = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        b = prev
        if f == 0:
            pred = 0
        elif f == 1:
            pred = a
        elif f == 2:
            pred = b
        elif f == 3:
            pred = (a + b) // 2
        else:
            p = a + b - c
            pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
            pred = np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))
        out += bytes([f]) + ((line - pred) & 255).astype(np.uint8).tobytes()
        prev = line
    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(out)) + _chunk(b"IEND", b"")
    )


# Character number (file prefix) -> (alphabet, character folder). Numbers are not in
# alphabetical order on purpose: the loader must order by number, as the npz does.
TINY = {7: ("Beta", "character01"), 3: ("Alpha", "character02"), 5: ("Alpha", "character01")}
TINY_SIZE, TINY_DRAWERS = 12, 3


def _tiny_image(number: int, drawer: int) -> np.ndarray:
    """1-bit image, 1 = white paper, with a black block depending on number and drawer."""
    img = np.ones((TINY_SIZE, TINY_SIZE), dtype=np.uint8)
    img[number : number + 3, drawer : drawer + 4] = 0
    return img


def _tiny_files(prefix: str = "images_background"):
    for number, (alphabet, char) in TINY.items():
        for drawer in range(TINY_DRAWERS):
            name = f"{prefix}/{alphabet}/{char}/{number:04d}_{drawer + 1:02d}.png"
            yield name, _png(_tiny_image(number, drawer), filters=(0, 1, 2, 3, 4))


def _write_zip(path: Path, files) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files:
            zf.writestr(name, data)
    return path


def _write_tree(root: Path, files) -> Path:
    for name, data in files:
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return root


def _expected_tiny_ink() -> np.ndarray:
    order = sorted(TINY)
    return np.stack(
        [[1.0 - _tiny_image(n, d) for d in range(TINY_DRAWERS)] for n in order]
    ).astype(np.float32)


@pytest.fixture(autouse=True)
def _fresh_cache():
    yield
    # Keep the real (shared) sets cached across tests; drop synthetic tmp entries.
    for key in [k for k in O._CACHE if str(OMNI) not in k[0]]:
        del O._CACHE[key]


# ----------------------------------------------------------------------------- PNG layout


def test_synthetic_zip_and_folder_give_same_data(tmp_path):
    zpath = _write_zip(tmp_path / "z" / "images_background.zip", _tiny_files())
    folder = _write_tree(tmp_path / "f", _tiny_files())
    from_zip = D.load_omniglot(zpath, image_size=None)
    from_dir = D.load_omniglot(folder, image_size=None)
    expected = _expected_tiny_ink()
    for data in (from_zip, from_dir):
        assert data.images.shape == (3, TINY_DRAWERS, TINY_SIZE, TINY_SIZE)
        assert data.images.dtype == np.float32
        np.testing.assert_array_equal(data.images, expected)
        assert data.character_names == ("Alpha/character02", "Alpha/character01",
                                        "Beta/character01")
        assert data.alphabet_names == ("Alpha", "Beta")
        np.testing.assert_array_equal(data.alphabet_ids, [0, 0, 1])
        np.testing.assert_array_equal(data.character_ids, [0, 1, 2])
        assert data.split == "background"


def test_extracted_folder_found_by_layout_and_by_name(tmp_path):
    _write_tree(tmp_path, _tiny_files())
    by_name = D.load_omniglot(tmp_path, image_size=None)  # finds images_background/
    by_layout = D.load_omniglot(tmp_path / "images_background", image_size=None)
    np.testing.assert_array_equal(by_name.images, by_layout.images)
    # an extracted background set is never taken for the evaluation set
    with pytest.raises(FileNotFoundError, match="images_evaluation"):
        D.load_omniglot(tmp_path, split="evaluation")
    _write_tree(tmp_path / "x", _tiny_files("images_background_small2"))
    small2 = D.load_omniglot(tmp_path / "x" / "images_background_small2", image_size=None)
    assert small2.split == "background_small2"


def test_png_layout_rejects_uneven_drawers(tmp_path):
    files = [f for f in _tiny_files() if not f[0].endswith("0007_03.png")]
    zpath = _write_zip(tmp_path / "images_background.zip", files)
    with pytest.raises(ValueError, match="different numbers of drawings"):
        D.load_omniglot(zpath)


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_builtin_png_decoder_all_filters(depth):
    rng = np.random.default_rng(depth)
    levels = rng.integers(0, 2**depth, size=(9, 13))
    data = _png(levels, depth=depth, filters=(0, 1, 2, 3, 4))
    got = P.decode_png_builtin(data)
    np.testing.assert_array_equal(got, levels * (255 // (2**depth - 1)))


def test_builtin_decoder_used_without_pillow(tmp_path, monkeypatch):
    monkeypatch.setattr(P, "_PIL_IMAGE", None)
    zpath = _write_zip(tmp_path / "images_background.zip", _tiny_files())
    data = D.load_omniglot(zpath, image_size=None, cache=False)
    np.testing.assert_array_equal(data.images, _expected_tiny_ink())


@needs_shared
def test_builtin_decoder_matches_pillow_on_real_pngs():
    pil = pytest.importorskip("PIL.Image")
    import io

    with zipfile.ZipFile(OMNI / "images_background_small1.zip") as zf:
        names = [n for n in zf.namelist() if n.endswith(".png")][::97]
        for name in names:
            raw = zf.read(name)
            expected = np.asarray(pil.open(io.BytesIO(raw)).convert("L"))
            np.testing.assert_array_equal(P.decode_png_builtin(raw), expected)


# ----------------------------------------------------------------------------- real data


@needs_shared
def test_real_npz_shapes_range_and_labels():
    bg = D.load_omniglot(SHARED, split="background")
    ev = D.load_omniglot(SHARED, split="evaluation")
    assert bg.images.shape == (964, 20, 28, 28)
    assert ev.images.shape == (659, 20, 28, 28)
    for data in (bg, ev):
        assert data.images.dtype == np.float32
        assert data.images.min() == 0.0 and data.images.max() == 1.0
        # ink is the minority: ~8% of the area, so paper really is 0.0
        assert 0.03 < data.images.mean() < 0.2
        # antialiasing leaves grey edge pixels
        assert ((data.images > 0.05) & (data.images < 0.95)).mean() > 0.01
        np.testing.assert_array_equal(data.character_ids, np.arange(data.n_classes))
        assert data.alphabet_ids is None and data.alphabet_names is None


@needs_shared
def test_small1_zip_is_pixel_identical_to_npz():
    small = D.load_omniglot(OMNI / "images_background_small1.zip", image_size=None)
    assert small.images.shape == (136, 20, 105, 105)
    assert set(np.unique(small.images)) == {0.0, 1.0}
    assert small.alphabet_names == ("Balinese", "Early_Aramaic", "Greek", "Korean", "Latin")
    assert small.split == "background_small1"
    with zipfile.ZipFile(OMNI / "images_background_small1.zip") as zf:
        number = {}
        for n in zf.namelist():
            parts = n.split("/")
            if n.endswith(".png"):
                number[f"{parts[-3]}/{parts[-2]}"] = int(parts[-1][:4])
    rows = np.array([number[name] - 1 for name in small.character_names])
    with np.load(OMNI / "images_background.npz", allow_pickle=False) as f:
        paper = f["images"][rows].view(np.uint8) != 0
    np.testing.assert_array_equal(small.images, (~paper).astype(np.float32))
    # and through the same resize both forms agree exactly
    small28 = D.load_omniglot(OMNI / "images_background_small1.zip")
    bg28 = D.load_omniglot(SHARED, split="background")
    np.testing.assert_array_equal(small28.images, bg28.images[rows])


@needs_shared
def test_resize_sizes_and_ink_preserved():
    native = D.load_omniglot(OMNI / "images_background_small1.zip", image_size=None)
    for size in (14, 28, 50):
        data = D.load_omniglot(OMNI / "images_background_small1.zip", image_size=size)
        assert data.images.shape == (136, 20, size, size)
        assert data.images.min() >= 0.0 and data.images.max() <= 1.0
        np.testing.assert_allclose(data.images.mean(), native.images.mean(), rtol=0.05)


@needs_shared
def test_resize_matches_pillow_bilinear():
    """The filter is Pillow's (antialiased) BILINEAR, as torchvision Resize on PIL images."""
    pil = pytest.importorskip("PIL.Image")
    import io

    data = D.load_omniglot(OMNI / "images_background_small1.zip")
    with zipfile.ZipFile(OMNI / "images_background_small1.zip") as zf:
        folder = data.character_names[3]
        names = sorted(n for n in zf.namelist() if f"/{folder}/" in n and n.endswith(".png"))
        for d, name in enumerate(names[:5]):
            im = pil.open(io.BytesIO(zf.read(name))).convert("L").resize((28, 28), pil.BILINEAR)
            expected = 1.0 - np.asarray(im, dtype=np.float32) / 255.0
            np.testing.assert_allclose(data.images[3, d], expected, atol=1 / 255 + 1e-6)


@needs_shared
def test_rotations_are_rotated_images():
    plain = D.load_omniglot(OMNI / "images_background_small1.zip")
    rot = D.load_omniglot(OMNI / "images_background_small1.zip", rotations=True)
    assert rot.images.shape == (4 * 136, 20, 28, 28)
    np.testing.assert_array_equal(rot.rotations[:8], [0, 90, 180, 270] * 2)
    np.testing.assert_array_equal(rot.character_ids, np.repeat(plain.character_ids, 4))
    assert rot.character_names[4:8] == (plain.character_names[1],) * 4
    for i in (0, 57, 135):
        for k in range(4):
            np.testing.assert_array_equal(
                rot.images[4 * i + k], np.rot90(plain.images[i], k, axes=(1, 2))
            )
    assert not np.array_equal(rot.images[1], rot.images[0])


# ----------------------------------------------------------------------------- splits


def test_vinyals_indices_sizes_disjoint_deterministic():
    idx = D.omniglot_split_indices("vinyals")
    assert {k: len(v) for k, v in idx.items()} == {"train": 1100, "val": 100, "test": 423}
    union = np.concatenate(list(idx.values()))
    np.testing.assert_array_equal(np.sort(union), np.arange(1623))  # no overlap, no loss
    again = D.omniglot_split_indices("vinyals")
    for k in idx:
        np.testing.assert_array_equal(idx[k], again[k])
    other = D.omniglot_split_indices("vinyals", seed=2)
    assert not np.array_equal(idx["test"], other["test"])
    # the test characters are drawn from both sets
    assert (idx["test"] < 964).any() and (idx["test"] >= 964).any()


def test_lake_indices():
    idx = D.omniglot_split_indices("lake")
    np.testing.assert_array_equal(idx["train"], np.arange(964))
    np.testing.assert_array_equal(idx["test"], np.arange(964, 1623))
    assert "val" not in idx


@needs_shared
def test_real_splits_have_no_shared_character():
    for protocol, sizes in [("vinyals", (1100, 100, 423)), ("lake", (964, 659))]:
        splits = D.omniglot_splits(protocol, path=SHARED, rotations=True)
        assert tuple(s.n_classes // 4 for s in splits.values()) == sizes
        chars = [set(s.character_ids.tolist()) for s in splits.values()]
        for i in range(len(chars)):
            for j in range(i + 1, len(chars)):
                assert not chars[i] & chars[j]
        assert sum(len(c) for c in chars) == 1623


@needs_shared
def test_split_images_come_from_the_right_characters():
    bg = D.load_omniglot(SHARED, split="background")
    ev = D.load_omniglot(SHARED, split="evaluation")
    test = D.load_omniglot_split("test", path=SHARED)
    np.testing.assert_array_equal(test.character_ids, D.omniglot_split_indices()["test"])
    for j in (0, 200, 422):
        cid = int(test.character_ids[j])
        src = bg.images[cid] if cid < 964 else ev.images[cid - 964]
        np.testing.assert_array_equal(test.images[j], src)


# ----------------------------------------------------------------------------- tasks


@needs_shared
def test_omniglot_tasks_shapes_and_labels():
    tasks = D.omniglot_tasks("test", n_way=5, k_shot=1, k_query=15, path=SHARED,
                             random_state=0)
    assert isinstance(tasks, NWayKShotTasks)
    assert len(tasks.classes_) == 4 * 423
    task = next(iter(tasks))
    assert task.X_support.shape == (5, 1, 28, 28) and task.X_query.shape == (75, 1, 28, 28)
    assert task.X_support.dtype == np.float32
    np.testing.assert_array_equal(np.unique(task.y_support), np.arange(5))
    np.testing.assert_array_equal(np.unique(task.y_query), np.arange(5))
    again = next(iter(D.omniglot_tasks("test", path=SHARED, random_state=0)))
    np.testing.assert_array_equal(task.X_query, again.X_query)
    val = D.omniglot_tasks("val", n_way=20, k_shot=5, k_query=5, rotations=False,
                           path=SHARED, random_state=1).sample(2)
    assert val[0].X_support.shape == (100, 1, 28, 28)
    np.testing.assert_array_equal(np.unique(val[1].y_query), np.arange(20))


def test_digits_tasks_flat_and_images():
    flat = D.load_digits_tasks(n_way=5, k_shot=2, k_query=3, random_state=0).sample(1)[0]
    assert flat.X_support.shape == (10, 64) and flat.X_query.shape == (15, 64)
    assert flat.X_support.dtype == np.float32 and 0 <= flat.X_support.min()
    assert flat.X_support.max() <= 1.0
    np.testing.assert_array_equal(np.unique(flat.y_query), np.arange(5))
    img = D.load_digits_tasks(3, 1, 4, split="test", as_images=True, random_state=0)
    task = img.sample(1)[0]
    assert task.X_support.shape == (3, 1, 8, 8) and task.X_query.shape == (12, 1, 8, 8)


def test_digits_splits_by_class_and_by_sample():
    _, y_train = D.load_digits_split("train")
    _, y_test = D.load_digits_split("test")
    assert set(y_train) == {0, 1, 2, 3, 4} and set(y_test) == {5, 6, 7, 8, 9}
    Xa, ya = D.load_digits_split("train", split_by="sample")
    Xb, yb = D.load_digits_split("test", split_by="sample")
    assert set(ya) == set(yb) == set(range(10))
    assert len(ya) + len(yb) == 1797
    rows_a = {r.tobytes() for r in Xa}
    assert sum(r.tobytes() in rows_a for r in Xb) < 10  # only duplicate images may repeat
    tasks = D.load_digits_tasks(10, 1, 5, split="test", split_by="sample", random_state=0)
    assert tasks.sample(1)[0].X_support.shape == (10, 64)
    with pytest.raises(ValueError, match="only 5 digits"):
        D.load_digits_tasks(n_way=6, split="test")
    with pytest.raises(ValueError, match="split must be"):
        D.load_digits_tasks(split="validation")
    with pytest.raises(ValueError, match="test_classes"):
        D.load_digits_split(test_classes=(3, 12))


# ----------------------------------------------------------------------------- paths/errors


def test_path_resolution_env_default_and_forms(tmp_path, monkeypatch):
    root = tmp_path / "shared" / "data"
    _write_zip(root / "omniglot" / "images_background.zip", _tiny_files())
    expected = _expected_tiny_ink()
    monkeypatch.setenv("METAFIT_DATA", str(root))
    np.testing.assert_array_equal(D.load_omniglot(image_size=None).images, expected)
    monkeypatch.delenv("METAFIT_DATA")
    # the working directory never decides: ../shared/data from here is not read
    (tmp_path / "repo").mkdir()
    monkeypatch.chdir(tmp_path / "repo")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with pytest.raises(FileNotFoundError, match="per-user data folder"):
        D.load_omniglot(image_size=None)
    # the per-user folder is the default
    assert D.data_home() == tmp_path / "xdg" / "metafit"
    _write_zip(D.data_home() / "omniglot" / "images_background.zip", _tiny_files())
    np.testing.assert_array_equal(D.load_omniglot(image_size=None).images, expected)
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert D.data_home() == tmp_path / "home" / ".local" / "share" / "metafit"
    for p in (root, root / "omniglot", root / "omniglot" / "images_background.zip"):
        np.testing.assert_array_equal(D.load_omniglot(p, image_size=None).images, expected)


def test_missing_data_errors_name_what_was_looked_for(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.load_omniglot(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"images_evaluation\.npz.*images_evaluation\.zip"):
        D.load_omniglot(tmp_path, split="evaluation")
    monkeypatch.setenv("METAFIT_DATA", str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match="METAFIT_DATA"):
        D.load_omniglot()
    _write_zip(tmp_path / "images_background.zip", _tiny_files())
    with pytest.raises(FileNotFoundError, match="format='npz'"):
        D.load_omniglot(tmp_path, format="npz")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="neither an .npz nor a .zip"):
        D.load_omniglot(tmp_path / "notes.txt")


def test_bad_arguments(tmp_path):
    zpath = _write_zip(tmp_path / "images_background.zip", _tiny_files())
    with pytest.raises(ValueError, match="split must be one of"):
        D.load_omniglot(zpath.parent, split="train")
    with pytest.raises(ValueError, match="image_size must be >= 1"):
        D.load_omniglot(zpath, image_size=0)
    for bad in (2.5, True, "28"):
        with pytest.raises(TypeError, match="image_size must be an int"):
            D.load_omniglot(zpath, image_size=bad)
    with pytest.raises(ValueError, match="format must be"):
        D.load_omniglot(zpath, format="jpg")
    with pytest.raises(ValueError, match="protocol must be"):
        D.omniglot_split_indices("maml")
    with pytest.raises(ValueError, match="no validation split"):
        D.load_omniglot_split("val", protocol="lake", path=tmp_path)
    with pytest.raises(ValueError, match="needs both official sets"):
        D.load_omniglot_split("train", path=zpath)
    with pytest.raises(ValueError, match="leave no test characters"):
        D.omniglot_split_indices(n_train=1500, n_val=123)


def test_cache_reuses_and_protects_arrays(tmp_path):
    zpath = _write_zip(tmp_path / "images_background.zip", _tiny_files())
    first = D.load_omniglot(zpath, image_size=6)
    assert D.load_omniglot(zpath, image_size=6) is first
    assert D.load_omniglot(zpath, image_size=8) is not first
    assert D.load_omniglot(zpath, image_size=6, cache=False) is not first
    with pytest.raises(ValueError, match="read-only"):
        first.images[0, 0, 0, 0] = 5.0
    # a changed file is read again
    files = [(n, _png(1 - _tiny_image(3, 0))) if "0005_01" in n else (n, d)
             for n, d in _tiny_files()]
    _write_zip(tmp_path / "images_background.zip", files)
    os.utime(zpath, ns=(1, 1))
    assert D.load_omniglot(zpath, image_size=6) is not first
    D.clear_omniglot_cache()
    assert not O._CACHE
