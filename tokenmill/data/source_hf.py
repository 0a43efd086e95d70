"""Images from a Hugging Face ``datasets`` dataset (``imagefolder``, ``parquet`` files, or a hub name)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .samples import Records
from .source_base import MapImageSource
from .source_imagefolder import held_out_split


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as error:
        raise ImportError(
            "HFSource needs the Hugging Face `datasets` package: `pip install datasets`"
        ) from error
    return datasets


class HFRecords:
    """Rows of one split as records; only the image column is read.

    The key names the split and row, plus the file path when the dataset knows it, so a
    warning about a broken image says which file it was.
    """

    def __init__(
        self, dataset: Any, image_column: str, split: str, rows: Sequence[int] | None = None
    ) -> None:
        self.dataset = dataset
        self.image_column = image_column
        self.split = split
        self.rows = list(rows) if rows is not None else None

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.dataset)

    def __getitem__(self, index: int) -> tuple[str, Any]:
        row = self.rows[index] if self.rows is not None else index
        payload = self.dataset[int(row)][self.image_column]
        path = payload.get("path") if isinstance(payload, dict) else None
        key = f"{self.split}/{row}" + (f":{path}" if path else "")
        return key, payload


class HFSource(MapImageSource):
    def __init__(
        self,
        path: str,
        data_dir: str | None = None,
        data_files: Any = None,
        name: str | None = None,
        train_split: str = "train",
        val_split: str | None = "validation",
        val_fraction: float = 0.01,
        image_column: str = "image",
        cache_dir: str | None = None,
        split_seed: int = 0,
    ) -> None:
        self.path = path
        self.data_dir = data_dir
        # Hydra hands over DictConfig/ListConfig; datasets wants plain containers.
        self.data_files = _to_plain(data_files)
        self.name = name
        self.train_split = train_split
        self.val_split = val_split
        self.val_fraction = float(val_fraction)
        self.image_column = image_column
        self.cache_dir = cache_dir
        self.split_seed = int(split_seed)
        self._records: tuple[HFRecords, HFRecords] | None = None

    def _load(self) -> Any:
        datasets = _import_datasets()
        loaded = datasets.load_dataset(
            self.path, self.name, data_dir=self.data_dir, data_files=self.data_files, cache_dir=self.cache_dir
        )
        if not isinstance(loaded, datasets.DatasetDict):
            raise TypeError(
                f"load_dataset({self.path!r}) returned {type(loaded).__name__}, expected a DatasetDict"
            )
        return loaded

    def prepare(self) -> None:
        self._load()  # downloads and caches once per node; setup() then reads the cache

    def _prepare_split(self, dataset: Any, split: str) -> Any:
        datasets = _import_datasets()
        columns = list(dataset.column_names)
        if self.image_column not in columns:
            raise KeyError(
                f"image_column {self.image_column!r} not found in split {split!r} of {self.path!r}; "
                f"available columns: {columns}"
            )
        dataset = dataset.select_columns([self.image_column])
        if isinstance(dataset.features[self.image_column], datasets.Image):
            # Keep the encoded bytes: a corrupt image must reach our decode/skip path instead of
            # raising inside datasets.
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        return dataset

    def _build(self) -> tuple[HFRecords, HFRecords]:
        if self._records is None:
            splits = self._load()
            if self.train_split not in splits:
                raise KeyError(
                    f"train_split {self.train_split!r} not in dataset {self.path!r}; available splits: {list(splits)}"
                )
            train = self._prepare_split(splits[self.train_split], self.train_split)
            if self.val_split is not None and self.val_split in splits:
                val = self._prepare_split(splits[self.val_split], self.val_split)
                self._records = (
                    HFRecords(train, self.image_column, self.train_split),
                    HFRecords(val, self.image_column, self.val_split),
                )
            else:
                train_rows, val_rows = held_out_split(len(train), self.val_fraction, self.split_seed)
                self._records = (
                    HFRecords(train, self.image_column, self.train_split, train_rows),
                    HFRecords(train, self.image_column, self.train_split, val_rows),
                )
        return self._records

    def train_records(self) -> Records:
        return self._build()[0]

    def val_records(self) -> Records:
        return self._build()[1]


def _to_plain(value: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:
        return value
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value
