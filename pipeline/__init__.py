"""spar-pipeline: Ray / DeepSpeed / WebDataset stages around the `spar` model library."""
__version__ = "0.1.0"


def open_cache(url: str, **kwargs):
    """Open a teacher cache (see `pipeline.cache.open_cache`)."""
    from pipeline.cache import open_cache as _open

    return _open(url, **kwargs)
