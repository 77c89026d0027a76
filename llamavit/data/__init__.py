"""Data: datasets (images, point clouds, clips), readers and timm-built transforms."""
from .clips import ClipFolder, MovingFashionMNIST, SyntheticClips, build_clip_dataset, write_clip_folder
from .datasets import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, ClassesAs, DatasetError, FashionMNIST, SyntheticImages,
                       build_dataset, check_classes, has_splits, is_latents_file, read_latents)
from .points import (FMNIST_THRESHOLD, POINT_EXTENSIONS, SYNTHETIC_SHAPES, FashionMNISTPoints, PointFolder,
                     SyntheticPoints, build_point_dataset, image_to_points, normalize_unit_sphere, read_point_file,
                     sample_points, scale_translate)
from .shards import ShardDataset, is_shard_dir, write_shards
from .transforms import (TransformConfig, aim_pretrain_transform, build_transform, generation_transform,
                         rgb_normalization)

__all__ = ["ClipFolder", "MovingFashionMNIST", "SyntheticClips", "build_clip_dataset", "write_clip_folder",
           "FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "ClassesAs", "DatasetError", "FashionMNIST", "SyntheticImages",
           "build_dataset", "check_classes", "has_splits", "is_latents_file", "read_latents", "TransformConfig",
           "aim_pretrain_transform", "build_transform", "generation_transform", "rgb_normalization", "ShardDataset",
           "is_shard_dir", "write_shards", "FMNIST_THRESHOLD", "POINT_EXTENSIONS", "SYNTHETIC_SHAPES",
           "FashionMNISTPoints", "PointFolder", "SyntheticPoints", "build_point_dataset", "image_to_points",
           "normalize_unit_sphere", "read_point_file", "sample_points", "scale_translate"]
