"""Data sets (CIFAR pickles, digits, Tiny-ImageNet / ImageNet folders) and the folder loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdtune.data import folder as folder_mod
from kdtune.data import list_datasets, load_data
from kdtune.data.folder import FolderLoader, random_resized_crop_params
from kdtune.errors import DataError
from tests.datagen import class_colour, write_image_folder, write_tiny_cifar10, write_tiny_cifar100


def test_all_data_sets_registered():
    assert {"cifar10", "cifar100", "digits", "tiny-imagenet", "imagenet"} <= set(list_datasets())


# ------------------------------------------------------------------------------------------------ CIFAR
def test_cifar100_pickle_round_trip(tmp_path):
    written = write_tiny_cifar100(tmp_path, n_train=200, n_test=100)
    b = load_data("cifar100", root=tmp_path, val_fraction=0.0)
    assert b.in_memory and b.num_classes == 100 and b.in_channels == 3 and b.image_size == 32
    assert b.train.x.dtype == torch.uint8 and b.train.y.dtype == torch.int64
    assert b.train.x.shape == (200, 3, 32, 32) and b.test.x.shape == (100, 3, 32, 32) and len(b.val) == 0
    # the known pattern, computed by hand: red = 8h + i, green = 8w + i, blue = 37i + 100 (mod 256)
    assert b.train.x[6, 0, 2, 9] == 22 and b.train.x[6, 1, 2, 9] == 78 and b.train.x[6, 2, 2, 9] == 66
    assert b.test.x[99, 0, 31, 0] == (8 * 31 + 99) % 256 and b.test.x[99, 1, 31, 0] == 99
    assert torch.equal(b.train.x, torch.from_numpy(written["x_train"]))
    assert torch.equal(b.train.y, torch.from_numpy(written["y_train"]))
    assert torch.equal(b.test.x, torch.from_numpy(written["x_test"]))
    assert torch.equal(b.test.y, torch.from_numpy(written["y_test"]))
    assert b.class_names[:2] == ["fine_000", "fine_001"] and len(b.class_names) == 100
    assert b.mean == (0.5071, 0.4867, 0.4408) and b.std == (0.2675, 0.2565, 0.2761)
    assert b.crop_padding == 4 and b.flip


def test_cifar10_pickle_round_trip_over_five_batches(tmp_path):
    written = write_tiny_cifar10(tmp_path, n_train=100, n_test=30)
    b = load_data("cifar10", root=tmp_path, val_fraction=0.0)
    assert b.num_classes == 10 and b.class_names == [f"class_{k}" for k in range(10)]
    assert torch.equal(b.train.x, torch.from_numpy(written["x_train"]))  # batches 1..5 concatenated in order
    assert torch.equal(b.train.y, torch.from_numpy(written["y_train"]))
    assert torch.equal(b.test.y, torch.from_numpy(written["y_test"]))
    assert b.train.x[57, 0, 1, 0] == 8 + 57 and b.mean == (0.4914, 0.4822, 0.4465)
    # data_root may also point at the cifar-10-batches-py directory itself
    b2 = load_data("cifar10", root=written["dir"], val_fraction=0.0)
    assert torch.equal(b2.train.x, b.train.x)


def test_cifar_val_carving_is_seeded_disjoint_and_stratified(tmp_path):
    written = write_tiny_cifar100(tmp_path, n_train=200, n_test=10)
    y_all = torch.from_numpy(written["y_train"])

    def index_of(x):  # the red value at (0, 0) is the image's index in the training file
        return x[:, 0, 0, 0].long()

    a = load_data("cifar100", root=tmp_path, val_fraction=0.5, seed=0)
    a2 = load_data("cifar100", root=tmp_path, val_fraction=0.5, seed=0)
    c = load_data("cifar100", root=tmp_path, val_fraction=0.5, seed=1)
    assert torch.equal(a.val.x, a2.val.x) and torch.equal(a.train.y, a2.train.y)
    assert not torch.equal(index_of(a.val.x), index_of(c.val.x))
    tr, va = set(index_of(a.train.x).tolist()), set(index_of(a.val.x).tolist())
    assert not tr & va and tr | va == set(range(200))
    assert torch.equal(a.val.y, y_all[index_of(a.val.x)])  # labels travel with their images
    assert torch.bincount(a.val.y, minlength=100).tolist() == [1] * 100  # 2 per class -> 1 in val
    assert len(a.test) == 10


@pytest.mark.parametrize(
    "name,folder", [("cifar100", "cifar-100-python"), ("cifar10", "cifar-10-batches-py")]
)
def test_cifar_missing_names_directory_and_fix(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        load_data(name, root=tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / folder) in msg and "download=true" in msg and "\n" not in msg


def test_cifar_corrupt_file_is_a_data_error(tmp_path):
    written = write_tiny_cifar100(tmp_path, n_train=100, n_test=10)
    (written["dir"] / "meta").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="meta"):
        load_data("cifar100", root=tmp_path)


# ------------------------------------------------------------------------------------------------ digits
def test_digits_shapes_values_and_fixed_test_split():
    from sklearn.datasets import load_digits

    a = load_data("digits", val_fraction=0.1, seed=0)
    b = load_data("digits", val_fraction=0.1, seed=1)
    assert a.num_classes == 10 and a.in_channels == 1 and a.image_size == 8
    assert a.crop_padding == 1 and not a.flip and len(a.mean) == len(a.std) == 1
    assert a.train.x.dtype == torch.uint8 and a.train.x.shape[1:] == (1, 8, 8)
    assert len(a.train) + len(a.val) + len(a.test) == 1797 and len(a.test) == 360
    assert len(a.val) == pytest.approx(0.1 * 1437, abs=10)
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)  # fixed, whatever the seed
    assert not torch.equal(a.val.y, b.val.y) or not torch.equal(a.val.x, b.val.x)
    assert a.mean == b.mean and 0.1 < a.mean[0] < 0.5 and 0.2 < a.std[0] < 0.6
    assert torch.bincount(a.test.y, minlength=10).min() >= 35  # stratified: ~36 per class
    # pixel values: round(v * 255 / 16) of scikit-learn's 0..16 images, found by content
    d = load_digits()
    expect = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8))
    assert int(a.train.x.max()) == 255 and int(a.train.x.min()) == 0
    x0 = a.test.x[0, 0]
    hits = [i for i in range(len(expect)) if torch.equal(expect[i], x0)]
    assert hits and int(d.target[hits[0]]) == int(a.test.y[0])


# ------------------------------------------------------------------------------------------------ folders
def _colour_label(x: torch.Tensor) -> int:
    """The class whose colour is nearest the image's median colour (robust to the corner patch and JPEG)."""
    med = x.float().flatten(1).median(dim=1).values
    dists = [float(((med - torch.tensor(class_colour(k), dtype=torch.float32)) ** 2).sum()) for k in range(3)]
    return int(np.argmin(dists))


@pytest.mark.parametrize("layout", ["tiny-imagenet", "imagefolder"])
def test_tiny_imagenet_layouts_load(tmp_path, layout):
    info = write_image_folder(tmp_path / "tiny-imagenet-200", classes=3, per_class=4, size=64, layout=layout)
    # official layout through <root>/tiny-imagenet-200; the other with data_root naming the folder itself
    root = tmp_path if layout == "tiny-imagenet" else tmp_path / "tiny-imagenet-200"
    b = load_data("tiny-imagenet", root=root, val_fraction=0.25, seed=0)
    assert b.in_memory and b.num_classes == 3 and b.class_names == info["classes"] and b.image_size == 64
    assert (
        b.train.x.shape == (9, 3, 64, 64)
        and b.val.x.shape == (3, 3, 64, 64)
        and b.test.x.shape == (6, 3, 64, 64)
    )
    assert b.train.x.dtype == torch.uint8 and b.test.y.dtype == torch.int64
    assert sorted(b.val.y.tolist()) == [0, 1, 2] and b.crop_padding == 8 and b.flip
    for split in (b.train, b.val, b.test):
        assert [_colour_label(x) for x in split.x] == split.y.tolist()
    if layout == "tiny-imagenet":
        assert b.test.y.tolist() == [0, 1, 2, 0, 1, 2]  # from val_annotations.txt; test/images ignored


def test_tiny_imagenet_cache_reused_and_rebuilt(tmp_path, monkeypatch):
    base = tmp_path / "tiny-imagenet-200"
    write_image_folder(base, classes=3, per_class=4, layout="tiny-imagenet")
    calls = []
    real = folder_mod._decode_images

    def counting(paths, size):
        calls.append(len(paths))
        return real(paths, size)

    monkeypatch.setattr(folder_mod, "_decode_images", counting)
    first = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.0)
    assert calls == [12, 6] and (base / "kdtune_cache_train.pt").is_file()
    second = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.0)
    assert calls == [12, 6]  # nothing decoded: both splits came from the cache
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)
    # a new training image changes the file list: train is decoded again, test still cached
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), class_colour(1), np.uint8)).save(
        base / "train" / first.class_names[1] / "images" / "extra.JPEG"
    )
    third = load_data("tiny-imagenet", root=tmp_path, val_fraction=0.0)
    assert calls == [12, 6, 13] and len(third.train) == 13
    assert torch.bincount(third.train.y).tolist() == [4, 5, 4]


def test_tiny_imagenet_missing_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="tiny-imagenet-200.*download=true"):
        load_data("tiny-imagenet", root=tmp_path)


def _imagenet(tmp_path, **kw):
    write_image_folder(tmp_path / "imagenet", classes=3, per_class=4, size=(48, 40), layout="imagefolder")
    return load_data("imagenet", root=tmp_path, **kw)


def test_imagenet_folder_with_val_carving(tmp_path):
    b = _imagenet(tmp_path, val_fraction=0.25, seed=0)
    assert not b.in_memory and b.image_size == 224 and b.num_classes == 3
    assert (len(b.train), len(b.val), len(b.test)) == (9, 3, 6)
    img, label = b.train[0]
    assert img.size == (48, 40) and img.mode == "RGB" and isinstance(label, int)
    assert _colour_label(torch.from_numpy(np.array(img)).permute(2, 0, 1)) == label
    tr, va = {p for p, _ in b.train.samples}, {p for p, _ in b.val.samples}
    assert not tr & va and len(tr | va) == 12
    assert sorted(b.val.targets) == [0, 1, 2]  # stratified
    assert sorted(b.test.targets) == [0, 0, 1, 1, 2, 2]
    again = load_data("imagenet", root=tmp_path / "imagenet", val_fraction=0.25, seed=0)  # root = the dir
    assert again.val.samples == b.val.samples
    others = [
        load_data("imagenet", root=tmp_path, val_fraction=0.25, seed=s).val.samples for s in range(1, 6)
    ]
    assert any(o != b.val.samples for o in others)


def test_imagenet_missing_or_flat_val_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="imagenet"):
        load_data("imagenet", root=tmp_path)
    base = tmp_path / "imagenet"
    write_image_folder(base, classes=2, per_class=2, size=32, layout="imagefolder")
    for d in (base / "val").iterdir():
        for f in d.iterdir():
            f.rename(base / "val" / f.name)
        d.rmdir()
    with pytest.raises(DataError, match="class folders"):
        load_data("imagenet", root=tmp_path)


# ------------------------------------------------------------------------------------------------ loader
def _epoch(loader, e):
    return [(x.clone(), y.clone()) for x, y in loader.epoch(e)]


def test_folder_loader_batches_and_normalisation(tmp_path):
    b = _imagenet(tmp_path, val_fraction=0.25, seed=0)
    kw = dict(device="cpu", image_size=32, data_seed=0, num_workers=0)
    train = FolderLoader(b.train, 4, train=True, mean=b.mean, std=b.std, **kw)
    assert len(train) == 2  # 9 images, drop_last in training
    batches = _epoch(train, 0)
    assert len(batches) == 2
    for x, y in batches:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    ordered = train.order(0)[:8]
    assert torch.equal(torch.cat([y for _, y in batches]), torch.tensor(b.train.targets)[ordered])
    raw = FolderLoader(b.test, 4, train=False, mean=(0, 0, 0), std=(1, 1, 1), **kw)
    norm = FolderLoader(b.test, 4, train=False, mean=b.mean, std=b.std, **kw)
    assert len(raw) == 2  # 6 images, no drop_last in evaluation
    raw_b, norm_b = _epoch(raw, 0), _epoch(norm, 0)
    assert [len(y) for _, y in raw_b] == [4, 2]
    xr, xn = torch.cat([x for x, _ in raw_b]), torch.cat([x for x, _ in norm_b])
    assert torch.equal(xr * 255, (xr * 255).round()) and 0 <= xr.min() and xr.max() <= 1
    mean, std = torch.tensor(b.mean).view(1, 3, 1, 1), torch.tensor(b.std).view(1, 3, 1, 1)
    torch.testing.assert_close(xn, (xr - mean) / std, atol=1e-5, rtol=1e-5)
    assert torch.cat([y for _, y in raw_b]).tolist() == b.test.targets  # evaluation keeps dataset order
    assert [_colour_label((x * 255).round().to(torch.uint8)) for x in xr] == b.test.targets


def test_folder_loader_views_are_seeded_by_data_seed_epoch_and_index(tmp_path):
    b = _imagenet(tmp_path, val_fraction=0.0, seed=0)  # 12 training images

    def views(data_seed, e, workers=0, torch_seed=0):
        loader = FolderLoader(
            b.train,
            4,
            train=True,
            device="cpu",
            mean=b.mean,
            std=b.std,
            image_size=24,
            data_seed=data_seed,
            num_workers=workers,
        )
        torch.manual_seed(torch_seed)  # the global RNG must play no part
        x = torch.cat([x for x, _ in loader.epoch(e)])
        return {int(i): v for i, v in zip(loader.order(e), x)}

    a = views(0, 1)
    assert all(torch.equal(a[i], v) for i, v in views(0, 1, torch_seed=99).items())
    assert all(torch.equal(a[i], v) for i, v in views(0, 1, workers=2).items())  # not worker RNG either
    other_epoch, other_seed = views(0, 2), views(5, 1)
    assert sum(not torch.equal(a[i], other_epoch[i]) for i in a) >= 10
    assert sum(not torch.equal(a[i], other_seed[i]) for i in a) >= 10
    loader = FolderLoader(
        b.train, 4, train=True, device="cpu", mean=b.mean, std=b.std, image_size=24, data_seed=0
    )
    assert not torch.equal(loader.order(1), loader.order(2)) and sorted(loader.order(1).tolist()) == list(
        range(12)
    )


def test_random_resized_crop_params_in_bounds_and_seeded():
    seen = set()
    for s in range(200):
        top, left, h, w = random_resized_crop_params(40, 48, torch.Generator().manual_seed(s))
        assert 0 < h <= 40 and 0 < w <= 48 and 0 <= top <= 40 - h and 0 <= left <= 48 - w
        assert 0.07 <= h * w / (40 * 48) <= 1.0
        seen.add((top, left, h, w))
    assert len(seen) > 150
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert random_resized_crop_params(40, 48, g1) == random_resized_crop_params(40, 48, g2)
    # a 1x100 strip admits no crop of aspect within [3/4, 4/3] and area >= 8 %: central fallback
    assert random_resized_crop_params(1, 100, torch.Generator().manual_seed(0)) == (0, 49, 1, 1)
