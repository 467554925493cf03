"""The dataset side of the trainer: scanning folders, drawing captions, ordering, buckets, saving copies."""

from .buckets import Bucket, BucketSet, PreparedImage, assign_buckets, bucket_counts, prepare_image
from .captions import caption_variants, caption_varies, choose_variant, draw_caption
from .errors import DatasetError, ProblemReason
from .images import IMAGE_EXTENSIONS, MAX_IMAGE_PIXELS, is_image_file, load_image, probe_image, to_rgb
from .materialize import SaveReport, save_dataset
from .order import Sample, batch_samples, draw_samples, epoch_order
from .preview import dataset_summary, preview_samples, problems_report
from .scan import Item, Problem, ScannedDataset, parse_kohya_folder, scan_dataset

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "Bucket",
    "BucketSet",
    "DatasetError",
    "Item",
    "PreparedImage",
    "Problem",
    "ProblemReason",
    "Sample",
    "SaveReport",
    "ScannedDataset",
    "assign_buckets",
    "batch_samples",
    "bucket_counts",
    "caption_variants",
    "caption_varies",
    "choose_variant",
    "dataset_summary",
    "draw_caption",
    "draw_samples",
    "epoch_order",
    "is_image_file",
    "load_image",
    "parse_kohya_folder",
    "prepare_image",
    "preview_samples",
    "probe_image",
    "problems_report",
    "save_dataset",
    "scan_dataset",
    "to_rgb",
]
