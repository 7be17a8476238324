"""A cache pins its teacher's weights file by sha256 (``teacher.json``): the next cache run, its
teacher actors and training load those bytes on every node or refuse, naming the URL and both
digests; a file replaced at the same URL never mixes two teachers."""
import uuid

import fsspec
import pyarrow as pa
import pytest
import torch

import spar
from pipeline.cache import shards
from pipeline.cache.job import CacheConfig, claim_output
from pipeline.cache.reader import FingerprintMismatch
from pipeline.cache.teacher import TeacherActor
from pipeline.config import parse_config
from pipeline.storage import Storage
from pipeline.train.job import TrainConfig, student_source
from spar.weights import WeightsMismatch, verified_weights, weights_identity


def _put_weights(url: str, seed: int, tmp_path) -> torch.Tensor:
    """Tiny-teacher weights of `seed` at `url`; returns one of their tensors."""
    bb = spar.load_backbone("maskclip-test", pretrained=None, init_seed=seed)
    with fsspec.open(url, "wb") as f:
        f.write(spar.export_open_clip(bb, tmp_path / f"w{seed}.safetensors").read_bytes())
    return bb.clip.visual.conv1.weight


def _actor(cfg: CacheConfig, fp: dict) -> TeacherActor:
    return TeacherActor(backbone=cfg.backbone, pretrained=cfg.pretrained, crop=None, stride=16, window_batch=0,
                        compute_dtype="float32", encoding="float16", image_ext="npy", device="cpu",
                        threads=torch.get_num_threads(), fingerprint=fp["fingerprint"], weights=fp["weights"])


@pytest.fixture
def replaced(tmp_path, monkeypatch):
    """A cache (its fingerprint and one committed shard) made on node a from weights at a URL (fsspec's
    memory filesystem: a bucket), whose file was replaced there afterwards: (config, fingerprint,
    weights URL, a tensor of the recorded weights, the new file's identity)."""
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-a"))  # node a's local copy of the weights
    url = f"memory://weights-{uuid.uuid4().hex[:8]}/teacher.safetensors"
    recorded = _put_weights(url, 1, tmp_path)
    out = str(tmp_path / "cache")
    cfg = parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}", f"pretrained={url}"])
    fp = claim_output(cfg, Storage())
    shards.create_tables(Storage(), out)
    shards._append(Storage(), out, shards.MANIFEST, pa.Table.from_pylist([{"key": "k0", "shard": "s"}],
                                                                         schema=shards.SAMPLE_SCHEMA))
    _put_weights(url, 2, tmp_path)
    new = weights_identity("spar-test-maskclip", str(tmp_path / "w2.safetensors"))  # the file there now
    return cfg, fp, url, recorded, new


def test_the_next_cache_run_and_its_actors_refuse_weights_replaced_at_their_url(replaced, tmp_path, monkeypatch):
    cfg, fp, url, recorded, new = replaced
    assert new["value"] != fp["weights"]["value"]
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-b"))  # a driver without a copy: it downloads
    with pytest.raises(FingerprintMismatch) as err:
        claim_output(cfg, Storage())
    for named in (url, fp["weights"]["value"], new["value"]):
        assert named in str(err.value)
    with pytest.raises(WeightsMismatch, match=new["value"]):  # a teacher actor on a node without a copy
        _actor(cfg, fp)
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-a"))  # node a still holds the recorded bytes
    assert claim_output(cfg, Storage()) == fp
    assert torch.equal(_actor(cfg, fp).bb.clip.visual.conv1.weight, recorded)


def test_training_refuses_weights_replaced_at_their_url(replaced, tmp_path, monkeypatch):
    cfg, fp, url, recorded, new = replaced
    train = parse_config(TrainConfig, [f"cache={cfg.output}"])
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-b"))
    with pytest.raises(FingerprintMismatch) as err:  # the driver, before any worker starts
        student_source(train, fp, Storage())
    for named in (url, fp["weights"]["value"], new["value"]):
        assert named in str(err.value)
    other = parse_config(TrainConfig, [f"cache={cfg.output}", f"pretrained={tmp_path / 'w2.safetensors'}"])
    with pytest.raises(FingerprintMismatch, match=f"expected {fp['weights']['value']}, found {new['value']}"):
        student_source(other, fp, Storage())  # the new file, given explicitly
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-a"))
    source = student_source(train, fp, Storage())
    # what every training worker does with it before it builds the student
    student = spar.load_backbone(source["backbone"], pretrained=verified_weights(source["pretrained"], source["weights"]))
    assert torch.equal(student.clip.visual.conv1.weight, recorded)
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-c"))
    with pytest.raises(WeightsMismatch, match=fp["weights"]["value"]):
        verified_weights(source["pretrained"], source["weights"])
