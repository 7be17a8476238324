"""spar-pipeline: Ray / DeepSpeed / WebDataset stages around the `spar` model library.

    cache/      stage 1: source images -> augment -> sliding-window teacher -> committed shards
    train/      stage 2: committed shards -> Ray Train + DeepSpeed student -> student.safetensors
    evaluate/   stage 3: open-vocabulary segmentation: benchmarks, tables, one-image segmentation
    bench/      throughput measurements (`jobs/benchmark.py`), one module per mode
    plan.py     what a cache + training run costs, before paying for it (`jobs/plan.py`)

Shared by every stage: `storage` (fsspec URLs), `config` (typed job configs), `cli` (the jobs'
wrapper), `logs`, `devices` (device and precision names), `ray_utils` (attach or start Ray),
`codecs` (image and .npy bytes), `samples` (built-in images, reading image URIs). A stage imports the shared modules and no other stage, except
the cache's reader (`pipeline.cache.reader`, also `pipeline.open_cache`), which train and
evaluate may use.
"""
__version__ = "0.1.0"


def open_cache(url: str, storage_options=None, **kwargs):
    """Open a teacher cache; `storage_options` are its filesystem's fsspec options (see
    `pipeline.cache.reader.open_cache`)."""
    from pipeline.cache.reader import open_cache as _open

    return _open(url, storage_options, **kwargs)
