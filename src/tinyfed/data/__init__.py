"""Data sets (find, verify, download, synthetic) and how they are split among clients."""

from tinyfed.data.dataset import Dataset, Source
from tinyfed.data.partition import PARTITIONS, label_histogram, partition
from tinyfed.data.sources import SOURCES, cache_dir, find_dataset_files, load_dataset

__all__ = [
    "SOURCES",
    "PARTITIONS",
    "Source",
    "Dataset",
    "cache_dir",
    "find_dataset_files",
    "label_histogram",
    "load_dataset",
    "partition",
]
