"""Stage 3, open-vocabulary segmentation (`jobs/evaluate.py`, `jobs/segment.py`). Data flow:

    datasets.py   the six benchmarks: (image, label) pairs from their standard layouts, labels mapped
    evaluator.py  the run's config; Evaluator: models + text classifiers, one image -> confusion per mode
    job.py        the evaluation job: images through the Evaluator locally (or the fan-out), results, tables
    fanout.py     the same Evaluator on a Ray actor pool; the driver sums per-image confusion matrices
    tables.py     the paper-style table, rebuilt from every result under an output
    segment.py    the segment job: one image, free-text classes -> overlay, mask, JSON, features
    classes/      the benchmarks' class-name files
"""
