"""Data: datasets and timm-built transforms."""
from .datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError, FashionMNIST, SyntheticImages, build_dataset
from .shards import ShardDataset, is_shard_dir, write_shards
from .transforms import TransformConfig, build_transform

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "DatasetError", "FashionMNIST", "SyntheticImages",
           "build_dataset", "TransformConfig", "build_transform", "ShardDataset", "is_shard_dir", "write_shards"]
