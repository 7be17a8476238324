"""Stage 1, the teacher cache (`jobs/cache_teacher.py`). Data flow, one module per step:

    job.py       the job: config, fingerprint claim, the Ray Data pipeline, resume, summary
    sources.py   list a source (folder / prefix, .txt / .parquet list, image tars, builtin) -> keys + URIs
    tasks.py     the Ray Data CPU tasks, torch-free: a source row or tar -> rows; a teacher batch -> one shard
    augment.py   read, decode and augment one (source, view): the frozen view and its parameters
    teacher.py   TeacherActor: the sliding-window teacher on a batch of views, targets quantised on the device
    encode.py    the sample format: tar members (.image.npy or .png, .target.npy, .json), quantisation, checksums
    shards.py    the on-storage layout: shard tars, the manifest and the commit protocol
    reader.py    open_cache / Cache: the committed cache for readers (training and evaluation use it)
    inspect.py   jobs/inspect_cache.py: summary, PCA contact sheet, and the audit that recomputes targets
"""
