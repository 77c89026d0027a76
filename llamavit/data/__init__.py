"""Data: datasets, readers and timm-built transforms."""
from .datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, ClassesAs, DatasetError, FashionMNIST, SyntheticImages,
                       build_dataset, check_classes, has_splits, is_latents_file, read_latents)
from .shards import ShardDataset, is_shard_dir, write_shards
from .transforms import (TransformConfig, aim_pretrain_transform, build_transform, generation_transform,
                         rgb_normalization)

__all__ = ["FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "ClassesAs", "DatasetError", "FashionMNIST", "SyntheticImages",
           "build_dataset", "check_classes", "has_splits", "is_latents_file", "read_latents", "TransformConfig",
           "aim_pretrain_transform", "build_transform", "generation_transform", "rgb_normalization", "ShardDataset",
           "is_shard_dir", "write_shards"]
