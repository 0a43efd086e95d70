"""tokenmill.data: batch contract per source, skipped-image accounting, determinism, resume,
DDP splitting, shard writing, Hydra configs and error messages. All data is made here from
the photographs bundled with scikit-image."""

from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tokenmill.data import (
    EmbeddedSource,
    EpochShardSampler,
    HFSource,
    ImageDataModule,
    ImageDecodeError,
    ImageFolderSource,
    ResumableDataLoader,
    StreamDataLoader,
    WebDatasetSource,
    decode_image,
)
from tokenmill.data.shards import make_shards, sample_key
from tokenmill.data.source_embedded import VAL_PHOTOS, skimage_data_dir
from tokenmill.data.transforms import random_resized_crop_box, shorter_edge_crop_box

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # small output images keep every test fast on CPU
LOGGER = "tokenmill.data"


# ------------------------------------------------------------------------------ helpers
def photo(name: str, max_side: int = 96) -> Image.Image:
    """A bundled photograph, shrunk so that files and shards stay tiny."""
    image = Image.open(skimage_data_dir() / name)
    image.thumbnail((max_side, max_side))
    return image


def encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format=fmt)
    return buffer.getvalue()


def truncated_jpeg() -> bytes:
    """Opens fine (valid header) but fails when the pixels are read."""
    data = encoded(photo("astronaut.png"), "JPEG")
    return data[: len(data) // 3]


def write_image_folder(root: Path, corrupt: bool = False) -> list[str]:
    """Two class folders of PNG/JPEG files (+ one truncated JPEG); returns the relative paths."""
    names = {
        "cats/chelsea.jpg": ("chelsea.png", "JPEG"),
        "cats/coffee.png": ("coffee.png", "PNG"),
        "misc/astronaut.png": ("astronaut.png", "PNG"),
        "misc/rocket.jpg": ("rocket.jpg", "JPEG"),
        "misc/camera.png": ("camera.png", "PNG"),
        "misc/ihc.jpg": ("ihc.png", "JPEG"),
    }
    for relative, (source, fmt) in names.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(encoded(photo(source), fmt))
    written = list(names)
    if corrupt:
        (root / "misc/broken.jpg").write_bytes(truncated_jpeg())
        written.append("misc/broken.jpg")
    return sorted(written)


def collect(loader) -> tuple[list[str], int, list[torch.Tensor]]:
    keys, skipped, images = [], 0, []
    for batch in loader:
        keys += batch["key"]
        skipped += int(batch["num_skipped"])
        images.append(batch["image"])
    return keys, skipped, images


def assert_batch_contract(batch: dict, batch_size: int) -> None:
    assert set(batch) == {"image", "key", "num_skipped"}
    image = batch["image"]
    assert image.dtype == torch.float32
    assert image.ndim == 4 and image.shape[1:] == (3, SIZE, SIZE)
    assert image.shape[0] == len(batch["key"]) <= batch_size
    assert all(isinstance(key, str) for key in batch["key"])
    assert batch["num_skipped"].dtype == torch.long and batch["num_skipped"].ndim == 0
    assert image.shape[0] + int(batch["num_skipped"]) <= batch_size
    if image.shape[0]:  # a batch whose samples were all dropped is empty
        assert image.min() >= -1.0 and image.max() <= 1.0
        assert image.max() - image.min() > 0.1  # real content, not a constant fill


def embedded_datamodule(seed: int = 0, **kwargs) -> ImageDataModule:
    options = dict(image_size=SIZE, batch_size=4, seed=seed)
    options.update(kwargs)
    return ImageDataModule(EmbeddedSource(num_train_samples=24, num_val_samples=6), **options)


# ------------------------------------------------------------------------------ decoding
@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "RGB"])
def test_decode_converts_every_mode_to_rgb(mode):
    source = photo("coffee.png", 40).convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    buffer = io.BytesIO()
    source.save(buffer, format=fmt)
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image.size == source.size


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"not an image", "UnidentifiedImageError"),
        (None, "empty"),
        ({"path": None, "bytes": None}, "neither"),
    ],
)
def test_decode_raises_named_error(payload, reason):
    with pytest.raises(ImageDecodeError, match=reason):
        decode_image(payload)


def test_truncated_file_fails_at_load_not_later():
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(truncated_jpeg())


def test_decode_accepts_hf_dict_and_path(tmp_path):
    data = encoded(photo("rocket.jpg", 30), "PNG")
    (tmp_path / "x.png").write_bytes(data)
    from_dict = decode_image({"bytes": None, "path": str(tmp_path / "x.png")})
    assert np.array_equal(np.asarray(from_dict), np.asarray(decode_image(data)))


# ------------------------------------------------------------------------------ transforms
def test_random_resized_box_respects_scale_and_ratio():
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(300, 200, (0.35, 1.0), (3 / 4, 4 / 3), generator)
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        width, height = right - left, bottom - top
        assert 0.33 <= width * height / (300 * 200) <= 1.0
        assert 3 / 4 - 0.02 <= width / height <= 4 / 3 + 0.02


def test_shorter_edge_box_centres_and_randomises_along_long_side():
    assert shorter_edge_crop_box(400, 200, 100, None) == (100.0, 0.0, 300.0, 200.0)
    generator = torch.Generator().manual_seed(0)
    lefts = {shorter_edge_crop_box(400, 200, 100, generator)[0] for _ in range(50)}
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 200
    # Portrait: the crop moves vertically and spans the full width.
    left, top, right, bottom = shorter_edge_crop_box(200, 400, 100, generator)
    assert (left, right) == (0.0, 200.0) and bottom - top == 200


def test_bad_transform_options_fail_at_construction():
    with pytest.raises(ValueError, match="train_crop"):
        embedded_datamodule(train_crop="center")
    with pytest.raises(ValueError, match="crop_scale"):
        embedded_datamodule(crop_scale=(0.5, 1.5))


# ------------------------------------------------------------------------------ embedded source
def test_embedded_batches_follow_contract():
    datamodule = embedded_datamodule()
    datamodule.setup("fit")
    train = list(datamodule.train_dataloader())
    assert len(train) == 24 // 4
    for batch in train:
        assert_batch_contract(batch, 4)
        assert len(batch["key"]) == 4 and int(batch["num_skipped"]) == 0
    val = list(datamodule.val_dataloader())
    assert sum(len(batch["key"]) for batch in val) == 6
    for batch in val:
        assert_batch_contract(batch, 4)


def test_embedded_validation_photos_never_trained_on():
    source = EmbeddedSource(num_train_samples=60, num_val_samples=8)
    train_names = {path.name for path in source.train_paths}
    val_names = {path.name for path in source.val_paths}
    assert val_names == set(VAL_PHOTOS) and not train_names & val_names
    train_stems = {source.train_records()[i][0].split("/")[0] for i in range(60)}
    val_stems = {source.val_records()[i][0].split("/")[0] for i in range(8)}
    assert train_stems == {path.stem for path in source.train_paths}  # every training photo is used
    assert val_stems == {"chelsea", "coffee"} and not train_stems & val_stems


def test_embedded_validation_is_identical_across_epochs_and_seeds():
    first = collect(embedded_datamodule(seed=0).val_dataloader())
    again = embedded_datamodule(seed=0).val_dataloader()
    again.sampler.set_epoch(3)  # Lightning sets it too; validation must not care
    second = collect(again)
    other_seed = collect(embedded_datamodule(seed=7).val_dataloader())
    assert first[0] == second[0] == other_seed[0]
    assert torch.equal(torch.cat(first[2]), torch.cat(second[2]))
    assert torch.equal(torch.cat(first[2]), torch.cat(other_seed[2]))
    val_images = torch.cat(first[2])
    assert not torch.equal(val_images[0], val_images[2])  # different crops of the same photo


# ------------------------------------------------------------------------------ determinism
def test_same_seed_gives_identical_batches_and_new_seed_or_epoch_differs():
    def first_epoch(seed: int, epoch: int = 0) -> tuple[list[str], torch.Tensor]:
        loader = embedded_datamodule(seed=seed).train_dataloader()
        loader.sampler.set_epoch(epoch)
        keys, _, images = collect(loader)
        return keys, torch.cat(images)

    keys_a, images_a = first_epoch(0)
    keys_b, images_b = first_epoch(0)
    assert keys_a == keys_b and torch.equal(images_a, images_b)
    keys_c, images_c = first_epoch(1)
    assert keys_c != keys_a and not torch.equal(images_c, images_a)
    keys_d, images_d = first_epoch(0, epoch=1)
    assert keys_d != keys_a
    # The same sample gets a different random crop in another epoch.
    same = keys_a.index(keys_d[0])
    assert not torch.equal(images_a[same], images_d[0])


def test_batches_do_not_depend_on_worker_count():
    keys_0, _, images_0 = collect(embedded_datamodule(num_workers=0).train_dataloader())
    keys_2, _, images_2 = collect(embedded_datamodule(num_workers=2).train_dataloader())
    assert keys_0 == keys_2
    assert torch.equal(torch.cat(images_0), torch.cat(images_2))


# ------------------------------------------------------------------------------ DDP sampler
@pytest.mark.parametrize("num_samples, world_size", [(10, 3), (12, 4), (2, 4)])
def test_sampler_rank_shards_are_equal_disjoint_and_covering(num_samples, world_size):
    shards = [
        EpochShardSampler(num_samples, seed=5, rank=r, world_size=world_size) for r in range(world_size)
    ]
    for sampler in shards:
        sampler.set_epoch(2)
    per_rank = [[index for _, index in sampler] for sampler in shards]
    lengths = {len(indices) for indices in per_rank}
    assert lengths == {len(shards[0])} == {-(-num_samples // world_size)}
    flat = [index for indices in per_rank for index in indices]
    assert set(flat) == set(range(num_samples))  # covering
    padding = len(flat) - num_samples
    assert padding < world_size or num_samples < world_size
    if num_samples % world_size == 0:
        assert len(set(flat)) == len(flat)  # disjoint when no padding is needed
    else:
        # Disjoint apart from the wrap-around padding, which repeats the permutation's start.
        assert len(flat) - len(set(flat)) == padding


def test_sampler_permutation_depends_on_seed_and_epoch_only():
    def order(seed, epoch):
        sampler = EpochShardSampler(50, seed=seed)
        sampler.set_epoch(epoch)
        return [index for _, index in sampler]

    assert order(0, 0) == order(0, 0)
    assert sorted(order(0, 0)) == list(range(50))
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    assert [index for _, index in EpochShardSampler(7, shuffle=False)] == list(range(7))


def test_ranks_yield_the_same_number_of_batches():
    # 26 samples over 3 ranks: 9 each after padding -> 2 full batches of 4 on every rank.
    datamodule = ImageDataModule(EmbeddedSource(26, 2), image_size=SIZE, batch_size=4)
    datamodule.setup("fit")
    counts = []
    for rank in range(3):
        sampler = EpochShardSampler(26, seed=0, rank=rank, world_size=3)
        loader = ResumableDataLoader(
            datamodule.train_dataset,
            sampler=sampler,
            batch_size=4,
            drop_last=True,
            collate_fn=datamodule.collate,
        )
        counts.append(len(loader))
        assert len(list(loader)) == len(loader)
    assert counts == [2, 2, 2]


# ------------------------------------------------------------------------------ resumable loader
def test_loader_is_lightning_stateful():
    from lightning.fabric.utilities.types import _Stateful

    assert isinstance(embedded_datamodule().train_dataloader(), _Stateful)


def run_epochs(loader, epochs: int) -> list[str]:
    keys = []
    for _ in range(epochs):
        keys += collect(loader)[0]
    return keys


@pytest.mark.parametrize("stop_epoch, stop_batches", [(0, 2), (1, 3), (1, 0)])
def test_resume_continues_exactly(stop_epoch, stop_batches):
    """Stop after ``stop_batches`` batches of epoch ``stop_epoch``, resume in a fresh datamodule."""
    reference = run_epochs(embedded_datamodule(seed=3).train_dataloader(), 3)

    loader = embedded_datamodule(seed=3).train_dataloader()
    seen = run_epochs(loader, stop_epoch)
    iterator = iter(loader)
    for _ in range(stop_batches):
        seen += next(iterator)["key"]
    state = loader.state_dict()
    assert state["epoch"] == stop_epoch and state["samples_yielded"] == 4 * stop_batches
    del iterator

    resumed = embedded_datamodule(seed=3).train_dataloader()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["samples_yielded"] == state["samples_yielded"]  # survives a second save
    resumed.sampler.set_epoch(stop_epoch)  # what Lightning does before iterating; must keep the offset
    seen += run_epochs(resumed, 3 - stop_epoch)
    assert seen == reference


def test_state_after_a_full_epoch_points_at_the_next_one():
    loader = embedded_datamodule().train_dataloader()
    collect(loader)
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["samples_yielded"] == 0


def test_load_state_rejects_bad_state():
    loader = embedded_datamodule().train_dataloader()
    with pytest.raises(KeyError, match="samples_yielded"):
        loader.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="outside"):
        loader.load_state_dict({"epoch": 0, "samples_yielded": 10_000})


def test_resume_on_another_world_size_warns_and_clamps(caplog):
    loader = embedded_datamodule().train_dataloader()  # 24 samples, one rank
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        loader.load_state_dict({"epoch": 2, "samples_yielded": 40, "world_size": 1, "dataset_size": 48})
    assert "dataset_size=24 (checkpoint: 48)" in caplog.text
    assert loader.state_dict()["epoch"] == 2 and loader.state_dict()["samples_yielded"] == 24
    assert collect(loader)[0] == []  # the clamped epoch is finished; the next one starts fresh
    assert len(collect(loader)[0]) == 24


def test_lightning_checkpoint_resume_mid_epoch(tmp_path):
    """Through Lightning's own fit-loop save/restore: resumed run sees exactly the unseen batches."""
    import lightning as L

    class KeyRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.keys: list[str] = []

        def training_step(self, batch, batch_idx):
            self.keys += batch["key"]
            return (self.weight * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    def fit(max_steps, ckpt_path=None):
        module = KeyRecorder()
        # Saves during training (on_train_batch_end), as a real run does; after step 4 of 6 in epoch 0.
        saver = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1, filename="{step}"
        )
        trainer = L.Trainer(
            max_steps=max_steps,
            limit_val_batches=0,
            logger=False,
            callbacks=[saver],
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            default_root_dir=tmp_path,
        )
        trainer.fit(module, datamodule=embedded_datamodule(seed=1), ckpt_path=ckpt_path)
        return module.keys

    reference = fit(max_steps=9)  # 6 batches per epoch: crosses the epoch boundary
    checkpoint = torch.load(tmp_path / "ckpt" / "step=4.ckpt", weights_only=False)
    loader_state = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    assert loader_state[0]["epoch"] == 0 and loader_state[0]["samples_yielded"] == 4 * 4
    resumed = fit(max_steps=9, ckpt_path=str(tmp_path / "ckpt" / "step=4.ckpt"))
    assert len(reference) == 9 * 4
    assert reference[:16] + resumed == reference
    # A checkpoint across the epoch boundary (step 8 = epoch 1, batch 2) resumes exactly too.
    resumed = fit(max_steps=9, ckpt_path=str(tmp_path / "ckpt" / "step=8.ckpt"))
    assert reference[:32] + resumed == reference


def test_lightning_overfit_batches_replaces_sampler_and_repeats_one_batch():
    """overfit_batches makes Lightning rebuild the loader with a SequentialSampler: it must still work."""
    import lightning as L

    class KeyRecorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.batches: list[tuple[list[str], torch.Tensor]] = []

        def training_step(self, batch, batch_idx):
            self.batches.append((batch["key"], batch["image"]))
            return (self.weight * batch["image"].mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    module = KeyRecorder()
    trainer = L.Trainer(
        overfit_batches=1,
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=embedded_datamodule())
    (first_keys, first_images), *rest = module.batches
    assert len(rest) == 2 and first_keys == ["astronaut/0", "brick/1", "camera/2", "cell/3"]
    for keys, images in rest:
        assert keys == first_keys and torch.equal(images, first_images)


# ------------------------------------------------------------------------------ image folder
def test_imagefolder_skips_and_reports_corrupt_file(tmp_path, caplog):
    files = write_image_folder(tmp_path / "images", corrupt=True)
    source = ImageFolderSource(str(tmp_path / "images"), val_fraction=0.3)  # 7 files: 5 train, 2 val
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=1)  # batch 1: drop_last drops nothing
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train_batches = list(datamodule.train_dataloader())
        val_batches = list(datamodule.val_dataloader())
    for batch in train_batches + val_batches:
        assert_batch_contract(batch, 1)
    assert len(train_batches) == 5 and len(val_batches) == 2
    train_keys = [key for batch in train_batches for key in batch["key"]]
    val_keys = [key for batch in val_batches for key in batch["key"]]
    assert not set(train_keys) & set(val_keys)
    assert sorted(train_keys + val_keys) == [name for name in files if name != "misc/broken.jpg"]
    assert sum(int(batch["num_skipped"]) for batch in train_batches + val_batches) == 1
    assert list(datamodule.skipped_keys) == ["misc/broken.jpg"]
    warnings = [record.getMessage() for record in caplog.records if "misc/broken.jpg" in record.getMessage()]
    assert len(warnings) == 1 and "truncated" in warnings[0]


def test_imagefolder_every_sample_once_with_val_root(tmp_path, caplog):
    files = write_image_folder(tmp_path / "train", corrupt=True)
    write_image_folder(tmp_path / "val")
    source = ImageFolderSource(str(tmp_path / "train"), val_root=str(tmp_path / "val"))
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=7)  # one batch = the whole folder
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        keys, skipped, _ = collect(datamodule.train_dataloader())
        collect(datamodule.train_dataloader())  # a second epoch: counted again, but warned once
    assert sorted(keys) == sorted(set(files) - {"misc/broken.jpg"}) and skipped == 1
    assert datamodule.num_skipped == 2 and list(datamodule.skipped_keys) == ["misc/broken.jpg"]
    assert sum("misc/broken.jpg" in record.getMessage() for record in caplog.records) == 1
    assert len(collect(datamodule.val_dataloader())[0]) == 6


def test_imagefolder_listing_is_sorted_and_split_is_seeded(tmp_path):
    write_image_folder(tmp_path / "images")
    first = ImageFolderSource(str(tmp_path / "images"), val_fraction=0.34)
    second = ImageFolderSource(str(tmp_path / "images"), val_fraction=0.34)
    other = ImageFolderSource(str(tmp_path / "images"), val_fraction=0.34, split_seed=1)
    val_keys = [key for key, _ in (first.val_records()[i] for i in range(len(first.val_records())))]
    assert len(val_keys) == 2
    assert val_keys == [second.val_records()[i][0] for i in range(2)]
    assert val_keys != [other.val_records()[i][0] for i in range(2)]
    train_keys = [first.train_records()[i][0] for i in range(len(first.train_records()))]
    assert train_keys == sorted(train_keys) and not set(train_keys) & set(val_keys)


def test_imagefolder_missing_or_empty_folder_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageDataModule(ImageFolderSource(str(missing))).setup("fit")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"empty.*no files with extensions"):
        ImageFolderSource(str(tmp_path / "empty")).train_records()


# ------------------------------------------------------------------------------ webdataset
@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """Shards from an image folder with class subfolders and one truncated JPEG."""
    write_image_folder(tmp_path / "images", corrupt=True)
    make_shards(tmp_path / "images", tmp_path / "shards", shard_size=3)
    return tmp_path / "shards"


def test_make_shards_writes_original_bytes_keys_and_classes(tmp_path, shard_dir):
    assert sorted(path.name for path in shard_dir.glob("*.tar")) == [
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
    ]
    assert json.loads((shard_dir / "classes.json").read_text()) == {"cats": 0, "misc": 1}
    members = {}
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({member.name: tar.extractfile(member).read() for member in tar.getmembers()})
    assert members["cats/chelsea.jpg"] == (tmp_path / "images/cats/chelsea.jpg").read_bytes()
    assert members["misc/ihc.cls"] == b"1" and members["cats/coffee.cls"] == b"0"
    assert len([name for name in members if not name.endswith(".cls")]) == 7
    assert sample_key(Path("a/b.c.jpg")) == "a/b_c" and sample_key(Path("x.png")) == "x"


def test_make_shards_cli_prints_patterns(tmp_path, capsys):
    import runpy
    import sys

    write_image_folder(tmp_path / "images")
    argv = [
        "make_shards.py",
        "--input",
        str(tmp_path / "images"),
        "--output",
        str(tmp_path / "out"),
        "--shard-size",
        "2",
        "--val-fraction",
        "0.34",
    ]
    old_argv, sys.argv = sys.argv, argv
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "scripts" / "make_shards.py"), run_name="__main__")
    finally:
        sys.argv = old_argv
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train-{000000..000001}.tar" in out and "val-{000000..000000}.tar" in out
    source = WebDatasetSource(
        str(tmp_path / "out" / "train-{000000..000001}.tar"),
        val_shards=str(tmp_path / "out" / "val-{000000..000000}.tar"),
    )
    keys, skipped, _ = collect(ImageDataModule(source, image_size=SIZE, batch_size=1).val_dataloader())
    assert len(keys) == 2 and skipped == 0


def test_webdataset_skips_corrupt_image_and_counts_it_once(shard_dir, caplog):
    source = WebDatasetSource(
        str(shard_dir / "train-{000000..000001}.tar"),
        val_shards=str(shard_dir / "train-000002.tar"),
        shuffle_buffer=4,
    )
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=2, train_crop="random")
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    assert isinstance(loader, StreamDataLoader)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(loader)
        val_keys, val_skipped, _ = collect(datamodule.val_dataloader())
    for batch in batches:
        assert_batch_contract(batch, 2)
    train_keys = [key for batch in batches for key in batch["key"]]
    skipped = sum(int(batch["num_skipped"]) for batch in batches) + val_skipped
    # Shards 0-1 hold the first 6 sorted files (incl. misc/broken), shard 2 the last one.
    assert sorted(train_keys + val_keys) == [
        "cats/chelsea",
        "cats/coffee",
        "misc/astronaut",
        "misc/camera",
        "misc/ihc",
        "misc/rocket",
    ]
    assert skipped == 1 and list(datamodule.skipped_keys) == ["misc/broken"]
    warnings = [record.getMessage() for record in caplog.records if "misc/broken" in record.getMessage()]
    assert len(warnings) == 1 and "truncated" in warnings[0]


def test_webdataset_sample_without_image_field_is_dropped_with_its_keys(tmp_path, caplog):
    import webdataset

    good = encoded(photo("rocket.jpg"), "JPEG")
    with webdataset.TarWriter(str(tmp_path / "a.tar")) as writer:
        writer.write({"__key__": "ok", "jpg": good})
        writer.write({"__key__": "caption-only", "txt": "a rocket", "json": b"{}"})
    with webdataset.TarWriter(str(tmp_path / "b.tar")) as writer:
        writer.write({"__key__": "val", "png": encoded(photo("coffee.png"), "PNG")})
    source = WebDatasetSource(str(tmp_path / "{a,b}.tar"))  # no val_shards: b.tar is held out
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        train = collect(datamodule.train_dataloader())
        val = collect(datamodule.val_dataloader())
    assert train[0] == ["ok"] and train[1] == 1 and val[0] == ["val"]
    message = datamodule.skipped_keys["caption-only"]
    assert "no image field" in message and "['json', 'txt']" in message


def test_webdataset_stream_is_seeded_and_reshuffles_per_epoch(shard_dir):
    def epoch_keys(seed, epoch, num_workers=0):
        source = WebDatasetSource(
            str(shard_dir / "train-{000000..000002}.tar"),
            val_shards=str(shard_dir / "train-000002.tar"),
            shuffle_buffer=3,
            num_train_samples=12,
        )
        loader = ImageDataModule(
            source, image_size=SIZE, batch_size=2, seed=seed, num_workers=num_workers
        ).train_dataloader()
        loader.set_epoch(epoch)
        keys, skipped, images = collect(loader)
        return keys, skipped, torch.cat(images)

    keys, skipped, images = epoch_keys(0, 0)
    assert len(keys) + skipped == 12  # num_train_samples fixes the epoch: cycles over the 7 samples
    assert set(keys) <= {
        "cats/chelsea",
        "cats/coffee",
        "misc/astronaut",
        "misc/camera",
        "misc/ihc",
        "misc/rocket",
    }
    again = epoch_keys(0, 0)
    assert again[0] == keys and torch.equal(again[2], images)
    assert epoch_keys(0, 1)[0] != keys
    assert epoch_keys(5, 0)[0] != keys


def test_webdataset_length_is_whole_batches_per_rank(shard_dir):
    source = WebDatasetSource(
        str(shard_dir / "train-{000000..000002}.tar"),
        val_shards=str(shard_dir / "train-000000.tar"),
        num_train_samples=20,
    )
    dataset = source.train_stream(
        lambda image, generator: torch.zeros(3, SIZE, SIZE), seed=0, batch_size=3, rank=1, world_size=2
    )
    assert len(dataset) == 3 * 3  # 20 // (2 ranks * 3) = 3 batches on each rank
    assert len(list(dataset)) == 9


def test_webdataset_missing_shards_error_names_them(tmp_path):
    source = WebDatasetSource(str(tmp_path / "train-{0000..0003}.tar"), val_shards=None)
    with pytest.raises(FileNotFoundError, match=r"4 of 4 shards .*train-0000\.tar"):
        ImageDataModule(source).setup("fit")


# ------------------------------------------------------------------------------ Hugging Face
def test_hf_imagefolder_skips_corrupt_file(tmp_path, caplog):
    write_image_folder(tmp_path / "images", corrupt=True)
    source = HFSource(
        "imagefolder", data_dir=str(tmp_path / "images"), val_fraction=0.15, cache_dir=str(tmp_path / "cache")
    )
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=3)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        datamodule.setup("fit")
        train_loader = datamodule.train_dataloader()
        assert isinstance(train_loader, ResumableDataLoader)  # map-style: resumable
        train = collect(train_loader)
        val = collect(datamodule.val_dataloader())
    assert len(datamodule.train_dataset) == 6 and len(datamodule.val_dataset) == 1
    for images in train[2] + val[2]:
        assert images.shape[1:] == (3, SIZE, SIZE) and images.dtype == torch.float32
    # 6 training rows in batches of 3 -> all seen; plus the held-out row.
    assert len(train[0]) + train[1] + len(val[0]) + val[1] == 7
    assert train[1] + val[1] == 1
    (bad_key,) = datamodule.skipped_keys
    assert bad_key.endswith("broken.jpg")
    assert sum(bad_key in record.getMessage() for record in caplog.records) == 1


def test_hf_parquet_with_image_feature_and_validation_split(tmp_path):
    import datasets

    def write_split(names, path):
        rows = {
            "image": [{"bytes": encoded(photo(name), "PNG"), "path": name} for name in names],
            "label": list(range(len(names))),
        }
        features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))

    write_split(["astronaut.png", "rocket.jpg", "ihc.png", "camera.png"], tmp_path / "train.parquet")
    write_split(["coffee.png"], tmp_path / "validation.parquet")
    source = HFSource(
        "parquet",
        data_files={
            "train": str(tmp_path / "train.parquet"),
            "validation": str(tmp_path / "validation.parquet"),
        },
        cache_dir=str(tmp_path / "cache"),
    )
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=2, val_batch_size=4)
    train_batches = list(datamodule.train_dataloader())
    val_batches = list(datamodule.val_dataloader())
    assert len(train_batches) == 2 and len(val_batches) == 1
    for batch in train_batches + val_batches:
        assert_batch_contract(batch, 4)
    assert val_batches[0]["key"] == ["validation/0:coffee.png"]


def test_hf_raw_bytes_column_and_wrong_column_name(tmp_path):
    import pandas as pd

    pd.DataFrame(
        {
            "png": [encoded(photo(n), "PNG") for n in ("astronaut.png", "rocket.jpg")] + [b"garbage"],
            "caption": ["a", "b", "c"],
        }
    ).to_parquet(tmp_path / "data.parquet")
    source = HFSource(
        "parquet",
        data_files=str(tmp_path / "data.parquet"),
        image_column="png",
        val_split=None,
        val_fraction=0.0,
        cache_dir=str(tmp_path / "cache"),
    )
    datamodule = ImageDataModule(source, image_size=SIZE, batch_size=3)
    keys, skipped, _ = collect(datamodule.train_dataloader())
    assert sorted(keys) == ["train/0", "train/1"] and skipped == 1
    assert datamodule.val_dataloader() == []  # val_fraction=0 and no split: validation skipped

    wrong = HFSource(
        "parquet",
        data_files=str(tmp_path / "data.parquet"),
        image_column="image",
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(KeyError, match=r"'image'.*available columns: \['png', 'caption'\]"):
        ImageDataModule(wrong).setup("fit")


# ------------------------------------------------------------------------------ Hydra configs
@pytest.mark.parametrize(
    "name, source_type",
    [
        ("embedded", EmbeddedSource),
        ("imagefolder", ImageFolderSource),
        ("webdataset", WebDatasetSource),
        ("hf", HFSource),
    ],
)
def test_data_configs_instantiate(name, source_type, tmp_path):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    config = OmegaConf.create({"seed": 123, "paths": {"data_dir": str(tmp_path)}})
    config.data = OmegaConf.load(ROOT / "conf" / "data" / f"{name}.yaml")
    datamodule = instantiate(config.data)
    assert isinstance(datamodule, ImageDataModule) and isinstance(datamodule.source, source_type)
    assert datamodule.seed == 123 and datamodule.image_size == 256
    if name == "webdataset":
        assert datamodule.train_transform.crop == "random"
        assert datamodule.source.train_pattern == f"{tmp_path}/imagenet/train-{{0000..0252}}.tar"
    if name in ("imagefolder", "hf"):
        root = datamodule.source.root if name == "imagefolder" else Path(datamodule.source.data_dir)
        assert root == tmp_path / "images"


def test_source_type_is_checked():
    with pytest.raises(TypeError, match="source must be"):
        ImageDataModule(source={"_target_": "tokenmill.data.EmbeddedSource"})


def test_iterating_data_leaves_the_global_rng_alone():
    datamodule = embedded_datamodule(num_workers=0)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    collect(datamodule.train_dataloader())
    collect(datamodule.val_dataloader())
    assert torch.equal(torch.rand(3), expected)
