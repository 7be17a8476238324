"""Stage 2, student training (`jobs/train_student.py`). Data flow, one module per step:

    job.py          the job: config, the cache opened on the driver, the Ray Train TorchTrainer
    epochs.py       the epoch plan of every rank (numpy arrays over every sample), and this rank's part
    loader.py       a rank's planned batches, decoded in background processes
    loop.py         what each Ray Train worker runs: epochs of planned batches, steps, padding steps
    validation.py   held-out samples (stable key hash, or a second cache) and their MSE vs the single pass
    engine.py       the student wrapped by DeepSpeed: precision and the generated DeepSpeed config
    checkpoint.py   pickle-free checkpoints: whole fp32 weights and AdamW state, the run's position (RunState)
    metrics.py      metrics.csv, TensorBoard events and loss_curve.png (rank 0); the optional key log
    export.py       student.safetensors and student.json at the end of the run
    collectives.py  the sums and gathers the loop needs across ranks

It reads the cache through `pipeline.cache.reader` only.
"""
