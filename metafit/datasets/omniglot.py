"""Omniglot (Lake, Salakhutdinov & Tenenbaum, 2015) for few-shot image classification.

Two on-disk forms of the official data are read:

* the **PNG layout** of brendenlake/omniglot: ``images_background.zip``,
  ``images_evaluation.zip``, ``images_background_small1.zip`` ... holding
  ``alphabet/character/NNNN_DD.png`` (105x105, 1-bit, white paper), as the zip itself or
  as an extracted folder;
* the **npz conversion** (``images_background.npz``, ``images_evaluation.npz``): ``images``
  bool ``[characters, 20, 105, 105]`` (True = white paper) and ``labels``.

Images come back as float32 with ink = 1.0 and paper = 0.0, resized with antialiased
bilinear filtering (the filter of Pillow's BILINEAR resize). Characters of a PNG archive
are ordered by the character number in their file names, the order the npz conversion
used, so both forms of one set give the same arrays. The PNG files themselves are read by
:mod:`metafit.datasets._png`.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metafit.datasets._png import read_png_layout
from metafit.task_sources import NWayKShotTasks

__all__ = [
    "OmniglotData",
    "load_omniglot",
    "load_omniglot_split",
    "omniglot_splits",
    "omniglot_split_indices",
    "omniglot_tasks",
    "clear_omniglot_cache",
]

SPLITS = ("background", "evaluation", "background_small1", "background_small2")
PROTOCOLS = {"vinyals": ("train", "val", "test"), "lake": ("train", "test")}
#: The environment variable that names the data folder when ``path=`` is not given.
DATA_ENV = "METAFIT_DATA"
_FORMATS = ("auto", "npz", "png")
_ROTATIONS = (0, 90, 180, 270)


@dataclass(eq=False)
class OmniglotData:
    """Omniglot images grouped by class.

    Attributes
    ----------
    images : ndarray of shape (n_classes, n_drawers, height, width), float32
        Ink = 1.0, paper = 0.0. Arrays shared with the in-process cache are read-only;
        call ``.copy()`` before changing them in place.
    character_ids : ndarray of shape (n_classes,), int64
        Character of each class. :func:`load_omniglot` gives the id within the file (the
        npz ``labels``); the protocol splits give pooled ids, where evaluation characters
        follow the background ones (``964 + id`` for the official sets).
    rotations : ndarray of shape (n_classes,), int64
        Counter-clockwise rotation of each class in degrees (all 0 without rotations).
    alphabet_ids : ndarray of shape (n_classes,) or None
        Index into ``alphabet_names``; None for the npz form, which has no alphabets.
    alphabet_names : tuple of str or None
        Sorted alphabet names.
    character_names : tuple of str or None
        ``"alphabet/character"`` folder of each class (PNG layout only).
    split : str
        The official set (``"background"`` ...) or protocol split (``"train"`` ...).
    source : tuple of str
        Files or folders the images were read from.
    """

    images: np.ndarray
    character_ids: np.ndarray
    rotations: np.ndarray
    alphabet_ids: np.ndarray | None
    alphabet_names: tuple[str, ...] | None
    character_names: tuple[str, ...] | None
    split: str
    source: tuple[str, ...]

    @property
    def n_classes(self) -> int:
        """Number of classes (characters, times 4 with rotations)."""
        return int(self.images.shape[0])

    @property
    def n_drawers(self) -> int:
        """Examples per class (20 drawers in Omniglot)."""
        return int(self.images.shape[1])

    @property
    def image_shape(self) -> tuple[int, int]:
        """(height, width) of one image."""
        return (int(self.images.shape[2]), int(self.images.shape[3]))

    def to_xy(self, channel: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Flatten to one row per image.

        Parameters
        ----------
        channel : bool, default=True
            Add a channel axis: X of shape ``(n, 1, H, W)`` for a conv net, else
            ``(n, H, W)``.

        Returns
        -------
        X : ndarray, float32
        y : ndarray of shape (n,), int64
            Class index ``0..n_classes-1`` of each row.
        """
        c, d, h, w = self.images.shape
        X = self.images.reshape((c * d, 1, h, w) if channel else (c * d, h, w))
        return X, np.repeat(np.arange(c, dtype=np.int64), d)

    def __repr__(self) -> str:
        alph = "none" if self.alphabet_names is None else len(self.alphabet_names)
        return (
            f"OmniglotData(split={self.split!r}, n_classes={self.n_classes}, "
            f"n_drawers={self.n_drawers}, image_shape={self.image_shape}, "
            f"rotated={bool(self.rotations.any())}, alphabets={alph})"
        )


# ----------------------------------------------------------------------------- paths


def data_home() -> Path:
    """The per-user data folder: ``%LOCALAPPDATA%\\metafit`` on Windows, else
    ``$XDG_DATA_HOME/metafit``, else ``~/.local/share/metafit``.

    Never a path relative to the working directory: where a program is started from must
    not decide which data it reads.
    """
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "metafit"
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".local" / "share"
    return base / "metafit"


def _default_root() -> tuple[Path, str]:
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env), f"${DATA_ENV}"
    return data_home(), "the per-user data folder (metafit.datasets.data_home())"


def _check_split(split) -> str:
    if split not in SPLITS:
        raise ValueError(
            f"split must be one of {', '.join(map(repr, SPLITS))}, got {split!r}; for the "
            "train/val/test protocols use load_omniglot_split or omniglot_splits."
        )
    return split


def _check_format(format) -> str:
    if format not in _FORMATS:
        raise ValueError(f"format must be one of {_FORMATS}, got {format!r}.")
    return format


def _is_png_tree(folder: Path) -> bool:
    """True when ``folder`` itself holds alphabet/character/*.png."""
    return any(folder.glob("*/*/*.png")) or any(folder.glob("*/*/*.PNG"))


def _split_from_name(name: str, default: str) -> str:
    m = re.fullmatch(r"images_(\w+?)(\.npz|\.zip)?", name)
    return m.group(1) if m and m.group(1) in SPLITS else default


def _resolve(path, split: str, format: str) -> tuple[Path, str, str]:
    """Return (source, kind, split) with kind "npz", "zip" or "dir"."""
    if path is None:
        root, origin = _default_root()
    else:
        root, origin = Path(path), "path"
    root = root.expanduser()
    if root.is_file():
        suffix = root.suffix.lower()
        kind = {".npz": "npz", ".zip": "zip"}.get(suffix)
        if kind is None:
            raise ValueError(f"{root} is neither an .npz nor a .zip file of Omniglot.")
        if format != "auto" and (kind == "npz") != (format == "npz"):
            raise ValueError(f"format={format!r} but {root} is a {suffix} file.")
        return root.resolve(), kind, _split_from_name(root.name, split)
    if not root.is_dir():
        raise FileNotFoundError(
            f"Omniglot data not found: {root.resolve()} (from {origin}) does not exist. Pass "
            "path= (data root, omniglot folder or file) or set $METAFIT_DATA."
        )
    stem = f"images_{split}"
    bases = [root, root / "omniglot"]
    looked = []
    for base in bases:
        candidates = []
        if format in ("auto", "npz"):
            candidates.append((base / f"{stem}.npz", "npz"))
        if format in ("auto", "png"):
            candidates += [(base / f"{stem}.zip", "zip"), (base / stem, "dir")]
        for cand, kind in candidates:
            looked.append(str(cand) + ("/" if kind == "dir" else ""))
            if (cand.is_file() if kind != "dir" else cand.is_dir()):
                return cand.resolve(), kind, split
    if format != "npz" and _is_png_tree(root):
        return root.resolve(), "dir", _split_from_name(root.name, split)
    raise FileNotFoundError(
        f"no Omniglot data for split {split!r} (format={format!r}) under {root.resolve()} "
        f"(from {origin}); looked for: {', '.join(looked)}, and for an extracted "
        "alphabet/character/*.png folder. Pass path= or set $METAFIT_DATA."
    )


# ----------------------------------------------------------------------------- reading


def _read_npz(source: Path):
    with np.load(source, allow_pickle=False) as f:
        if "images" not in f.files:
            raise ValueError(f"{source} has no 'images' array (found {f.files}).")
        images = f["images"]
        labels = f["labels"] if "labels" in f.files else None
    if images.ndim != 4:
        raise ValueError(
            f"{source}: 'images' must have shape (characters, drawers, height, width), got "
            f"{images.shape}."
        )
    if images.dtype != np.bool_ and images.dtype != np.uint8:
        raise ValueError(f"{source}: 'images' must be bool or uint8, got {images.dtype}.")
    if labels is None:
        ids = np.arange(images.shape[0], dtype=np.int64)
    else:
        labels = np.asarray(labels)
        if labels.shape != images.shape[:2] or np.any(labels != labels[:, :1]):
            raise ValueError(
                f"{source}: 'labels' must have shape {images.shape[:2]} with one label per "
                "character row."
            )
        ids = labels[:, 0].astype(np.int64)
    return images, ids


# ----------------------------------------------------------------------------- resizing


def _check_image_size(image_size) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise TypeError(
            f"image_size must be an int (side of the square output) or None for the native "
            f"105x105, got {image_size!r}."
        )
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}.")
    return int(image_size)


def _to_ink(raw: np.ndarray, image_size: int | None, chunk: int = 256) -> np.ndarray:
    """Convert paper-bright raw images [C, D, h, w] to float32 ink, resized."""
    c, d, h, w = raw.shape
    size = (h, w) if image_size is None else (image_size, image_size)
    is_bool = raw.dtype == np.bool_
    # The npz conversion stores True as the byte 0xFF, so bools are read through a uint8
    # view and compared with 0 rather than trusted as 0/1.
    flat = raw.reshape(c * d, h, w).view(np.uint8)
    out = np.empty((c * d, *size), dtype=np.float32)
    for start in range(0, c * d, chunk):
        part = torch.from_numpy(np.ascontiguousarray(flat[start : start + chunk]))
        if is_bool:
            ink = (part == 0).to(torch.float32)
        else:
            ink = 1.0 - part.to(torch.float32) / 255.0
        if size != (h, w):
            ink = torch.nn.functional.interpolate(
                ink.unsqueeze(1), size=size, mode="bilinear", antialias=True,
                align_corners=False,
            ).squeeze(1).clamp_(0.0, 1.0)
        out[start : start + len(part)] = ink.numpy()
    return out.reshape(c, d, *size)


# ----------------------------------------------------------------------------- cache

_CACHE: OrderedDict = OrderedDict()
_CACHE_MAX_ITEMS = 8
_CACHE_MAX_BYTES = 2 << 30


def clear_omniglot_cache() -> None:
    """Drop the arrays :func:`load_omniglot` keeps between calls in this process."""
    _CACHE.clear()


def _cache_key(source: Path, image_size: int | None):
    st = source.stat()
    return (str(source), st.st_mtime_ns, st.st_size, image_size)


def _cache_put(key, data: OmniglotData) -> None:
    _CACHE[key] = data
    while len(_CACHE) > _CACHE_MAX_ITEMS or (
        len(_CACHE) > 1 and sum(v.images.nbytes for v in _CACHE.values()) > _CACHE_MAX_BYTES
    ):
        _CACHE.popitem(last=False)


def _readonly(*arrays):
    for a in arrays:
        if a is not None:
            a.flags.writeable = False


# ----------------------------------------------------------------------------- loading


def _load_base(path, split: str, image_size: int | None, format: str, cache: bool):
    source, kind, split = _resolve(path, split, format)
    key = _cache_key(source, image_size) if cache else None
    if key is not None and key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    if kind == "npz":
        raw, ids = _read_npz(source)
        alphabet_ids = alphabet_names = names = None
    else:
        raw, alphabets, names = read_png_layout(source, kind)
        ids = np.arange(raw.shape[0], dtype=np.int64)
        alphabet_names = tuple(sorted(set(alphabets)))
        lookup = {a: i for i, a in enumerate(alphabet_names)}
        alphabet_ids = np.array([lookup[a] for a in alphabets], dtype=np.int64)
    images = _to_ink(raw, image_size)
    rotations = np.zeros(len(ids), dtype=np.int64)
    _readonly(images, ids, rotations, alphabet_ids)
    data = OmniglotData(
        images, ids, rotations, alphabet_ids, alphabet_names, names, split, (str(source),)
    )
    if key is not None:
        _cache_put(key, data)
    return data


def _rotate(data: OmniglotData) -> OmniglotData:
    """Each class becomes 4 classes: rotated by 0, 90, 180 and 270 degrees (CCW)."""
    c, d, h, w = data.images.shape
    if h != w:
        raise ValueError(f"rotations need square images, got {h}x{w}.")
    images = np.stack([np.rot90(data.images, k, axes=(2, 3)) for k in range(4)], axis=1)

    def rep(a):
        return None if a is None else np.repeat(a, 4, axis=0)

    names = data.character_names
    return OmniglotData(
        images.reshape(4 * c, d, h, w),
        rep(data.character_ids),
        np.tile(np.array(_ROTATIONS, dtype=np.int64), c) + rep(data.rotations),
        rep(data.alphabet_ids),
        data.alphabet_names,
        None if names is None else tuple(n for n in names for _ in range(4)),
        data.split,
        data.source,
    )


def load_omniglot(
    path=None,
    split: str = "background",
    image_size: int | None = 28,
    *,
    rotations: bool = False,
    format: str = "auto",
    cache: bool = True,
) -> OmniglotData:
    """Load one official Omniglot set from the npz conversion or the PNG layout.

    Parameters
    ----------
    path : str or Path, optional
        The data root (holding ``omniglot/``), the omniglot folder, an extracted PNG folder,
        or one ``.npz`` / ``.zip`` file (then ``split`` is read from its name
        ``images_<split>.*`` when it has that form). Defaults to ``$METAFIT_DATA``, then
        the per-user folder of :func:`data_home`.
    split : {"background", "evaluation", "background_small1", "background_small2"}
        Which official set to look for.
    image_size : int or None, default=28
        Side of the square output, resized with an antialiased bilinear filter; None keeps
        the native 105x105.
    rotations : bool, default=False
        Turn each character into 4 classes rotated by 0, 90, 180 and 270 degrees
        counter-clockwise (``numpy.rot90``), character-major.
    format : {"auto", "npz", "png"}, default="auto"
        Which form to look for in a folder; "auto" prefers the npz, then the zip, then an
        extracted ``images_<split>/`` folder.
    cache : bool, default=True
        Keep the loaded arrays in this process (keyed on file, modification time and
        image size) so repeated calls are cheap; the cached arrays are read-only.

    Returns
    -------
    OmniglotData
        ``images`` float32 ``(n_classes, 20, image_size, image_size)``, ink = 1.0.

    Raises
    ------
    FileNotFoundError
        If no data is found; the message lists every place looked at.
    ValueError, TypeError
        For an unknown split or format, a bad image_size, or a malformed file.

    Examples
    --------
    >>> data = load_omniglot(split="background")  # doctest: +SKIP
    >>> data.images.shape, data.images.dtype  # doctest: +SKIP
    ((964, 20, 28, 28), dtype('float32'))
    """
    _check_split(split)
    _check_format(format)
    image_size = _check_image_size(image_size)
    data = _load_base(path, split, image_size, format, cache)
    return _rotate(data) if rotations else data


# ----------------------------------------------------------------------------- protocols


def _check_protocol(protocol) -> tuple[str, ...]:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'vinyals' or 'lake', got {protocol!r}.")
    return PROTOCOLS[protocol]


def omniglot_split_indices(
    protocol: str = "vinyals",
    n_background: int = 964,
    n_evaluation: int = 659,
    *,
    seed: int = 1,
    n_train: int = 1100,
    n_val: int = 100,
) -> dict[str, np.ndarray]:
    """Pooled character ids of each split of a protocol.

    Pooled ids number the background characters ``0..n_background-1`` and the evaluation
    characters after them.

    Parameters
    ----------
    protocol : {"vinyals", "lake"}
        ``"vinyals"`` (Vinyals et al. 2016, MAML): pool both sets, shuffle with ``seed``,
        take ``n_train`` characters for training, ``n_val`` for validation and the rest
        (423 for the official sets) for testing. ``"lake"``: background set for training,
        evaluation set for testing.
    n_background, n_evaluation : int
        Number of characters in each set.
    seed : int, default=1
        Seed of the Vinyals shuffle (numpy ``default_rng``).
    n_train, n_val : int
        Vinyals split sizes.

    Returns
    -------
    dict of str to ndarray
        Sorted pooled ids per split: ``train``/``val``/``test`` or ``train``/``test``.
    """
    _check_protocol(protocol)
    if protocol == "lake":
        return {
            "train": np.arange(n_background, dtype=np.int64),
            "test": np.arange(n_background, n_background + n_evaluation, dtype=np.int64),
        }
    total = n_background + n_evaluation
    if n_train < 1 or n_val < 0 or n_train + n_val >= total:
        raise ValueError(
            f"n_train={n_train} and n_val={n_val} leave no test characters out of {total}."
        )
    perm = np.random.default_rng(seed).permutation(total)
    return {
        "train": np.sort(perm[:n_train]),
        "val": np.sort(perm[n_train : n_train + n_val]),
        "test": np.sort(perm[n_train + n_val :]),
    }


def _pool_select(parts: list[OmniglotData], pooled: np.ndarray, split: str) -> OmniglotData:
    """Pick pooled characters out of [background, evaluation] without building the pool."""
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) != 1:
        raise ValueError(f"the two sets disagree on (drawers, H, W): {sorted(shapes)}.")
    offsets = np.cumsum([0] + [p.n_classes for p in parts])
    imgs, ids, alph = [], [], []
    names: list[str] | None = []
    have_alph = all(p.alphabet_names is not None for p in parts)
    alphabet_names = (
        tuple(sorted({a for p in parts for a in p.alphabet_names})) if have_alph else None
    )
    for i, p in enumerate(parts):
        local = pooled[(pooled >= offsets[i]) & (pooled < offsets[i + 1])] - offsets[i]
        imgs.append(p.images[local])
        ids.append(local + offsets[i])
        if have_alph:
            lookup = {a: j for j, a in enumerate(alphabet_names)}
            alph.append(np.array([lookup[p.alphabet_names[a]] for a in p.alphabet_ids[local]],
                                 dtype=np.int64))
        if names is not None and p.character_names is not None:
            names += [p.character_names[j] for j in local]
        else:
            names = None
    return OmniglotData(
        np.concatenate(imgs),
        np.concatenate(ids).astype(np.int64),
        np.zeros(len(pooled), dtype=np.int64),
        np.concatenate(alph) if have_alph else None,
        alphabet_names,
        None if names is None else tuple(names),
        split,
        tuple(s for p in parts for s in p.source),
    )


def load_omniglot_split(
    split: str = "train",
    protocol: str = "vinyals",
    *,
    path=None,
    image_size: int | None = 28,
    rotations: bool = False,
    seed: int = 1,
    format: str = "auto",
    cache: bool = True,
) -> OmniglotData:
    """Load one split of a few-shot protocol over both official sets.

    Parameters
    ----------
    split : {"train", "val", "test"}
        ``"val"`` exists for the Vinyals protocol only.
    protocol : {"vinyals", "lake"}, default="vinyals"
        See :func:`omniglot_split_indices`.
    path : str or Path, optional
        A folder holding both ``images_background`` and ``images_evaluation`` (either
        form); defaults as in :func:`load_omniglot`.
    image_size, format, cache
        As in :func:`load_omniglot`.
    rotations : bool, default=False
        Rotate after splitting, so all 4 rotations of a character stay in one split.
    seed : int, default=1
        Seed of the Vinyals shuffle.

    Returns
    -------
    OmniglotData
        With pooled ``character_ids`` (unique across splits).
    """
    names = _check_protocol(protocol)
    if split not in names:
        raise ValueError(
            f"protocol {protocol!r} has splits {names}, got split={split!r}"
            + ("; the Lake protocol has no validation split." if split == "val" else ".")
        )
    if path is not None and Path(path).is_file():
        raise ValueError(
            f"a protocol split needs both official sets; pass the folder holding them, not "
            f"the file {path}."
        )
    _check_format(format)
    image_size = _check_image_size(image_size)
    parts = [_load_base(path, s, image_size, format, cache) for s in ("background", "evaluation")]
    pooled = omniglot_split_indices(
        protocol, parts[0].n_classes, parts[1].n_classes, seed=seed
    )[split]
    data = _pool_select(parts, pooled, split)
    return _rotate(data) if rotations else data


def omniglot_splits(
    protocol: str = "vinyals",
    *,
    path=None,
    image_size: int | None = 28,
    rotations: bool = False,
    seed: int = 1,
    format: str = "auto",
    cache: bool = True,
) -> dict[str, OmniglotData]:
    """All splits of a protocol, as ``{"train": ..., "val": ..., "test": ...}``.

    Parameters are those of :func:`load_omniglot_split`. The Lake protocol has no
    ``"val"`` entry.
    """
    return {
        s: load_omniglot_split(
            s, protocol, path=path, image_size=image_size, rotations=rotations, seed=seed,
            format=format, cache=cache,
        )
        for s in _check_protocol(protocol)
    }


def omniglot_tasks(
    split: str = "train",
    n_way: int = 5,
    k_shot: int = 1,
    k_query: int = 15,
    *,
    rotations: bool = True,
    image_size: int | None = 28,
    random_state=None,
    path=None,
    protocol: str = "vinyals",
    seed: int = 1,
    format: str = "auto",
) -> NWayKShotTasks:
    """Episodic N-way K-shot Omniglot tasks for one protocol split.

    Parameters
    ----------
    split : {"train", "val", "test"}
        Protocol split (see :func:`load_omniglot_split`).
    n_way, k_shot, k_query : int
        Classes per task, support and query images per class (20 drawers in all).
    rotations : bool, default=True
        Use the 4 rotations of each character as separate classes (as in MAML); this
        applies to whichever split is asked for.
    image_size : int or None, default=28
        Side of the square images.
    random_state : int, numpy Generator or None
        Seed of the task stream.
    path, protocol, seed, format
        As in :func:`load_omniglot_split`.

    Returns
    -------
    NWayKShotTasks
        Tasks with X of shape ``(n_way * k, 1, image_size, image_size)`` float32 and labels
        ``0..n_way-1``.

    Examples
    --------
    >>> tasks = omniglot_tasks("train", n_way=5, k_shot=1, random_state=0)  # doctest: +SKIP
    >>> task = next(iter(tasks))  # doctest: +SKIP
    >>> task.X_support.shape  # doctest: +SKIP
    (5, 1, 28, 28)
    """
    data = load_omniglot_split(
        split, protocol, path=path, image_size=image_size, rotations=rotations, seed=seed,
        format=format,
    )
    X, y = data.to_xy(channel=True)
    return NWayKShotTasks(X, y, n_way, k_shot, k_query, random_state=random_state)
