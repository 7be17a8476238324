"""Unit-test fixtures: a moto S3 server on 127.0.0.1 for the storage and proxy tests (no Ray)."""
import pytest


@pytest.fixture(scope="session")
def moto():
    """moto's S3 server in a process of its own, for the unit session; its endpoint."""
    from pipeline.bench.s3proxy import start_moto

    endpoint, proc = start_moto()
    yield endpoint
    proc.terminate()
    proc.wait(timeout=30)
