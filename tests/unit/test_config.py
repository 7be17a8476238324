"""Typed configs: presets, dotlist overrides, unknown keys, checks, secret redaction."""
import pytest

from pipeline.cache.job import CacheConfig
from pipeline.config import ConfigError, parse_config, to_yaml
from pipeline.storage import Storage


def test_defaults_are_the_papers():
    cfg = parse_config(CacheConfig, [])
    assert (cfg.backbone, cfg.pretrained, cfg.stride, cfg.crop, cfg.seed, cfg.views) == (
        "maskclip", "laion2b_s34b_b88k", 24, None, 0, 1)
    assert cfg.augment.scale == [2048, 1024] and cfg.augment.ratio_range == [0.5, 1.0]
    assert (cfg.augment.min_side, cfg.augment.crop_ratio, cfg.augment.keep_prob, cfg.augment.flip_prob) == (
        512, 0.4, 0.5, 0.5)


def test_preset_then_overrides(tmp_path):
    y = tmp_path / "p.yaml"
    y.write_text("stride: 32\naugment:\n  ratio_range: [0.3, 1.0]\n")
    cfg = parse_config(CacheConfig, [str(y), "stride=48", "teacher.batch_images=4"])
    assert cfg.stride == 48 and cfg.augment.ratio_range == [0.3, 1.0] and cfg.teacher.batch_images == 4
    ext = parse_config(CacheConfig, ["extended"])
    assert ext.augment.scale == [2560, 2560] and ext.augment.ratio_range == [0.2, 1.0]


@pytest.mark.parametrize("argv,msg", [
    (["strid=3"], "strid"), (["stride=abc"], "stride"), (["encoding=bf16"], "encoding"),
    (["views=0"], "views"), (["backbone=resnet"], "unknown backbone"), (["no_such_preset"], "preset"),
    (["augment.min_side=100"], "crop"), (["crop=200"], "patch size"), (["stride=300"], "uncovered"),
])
def test_errors_name_the_key(argv, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_config(CacheConfig, argv)


def test_secrets_never_reach_the_saved_config():
    cfg = parse_config(CacheConfig, ["storage_options.key=AKIAFAKE", "storage_options.secret=s3cr3t",
                                     "storage_options.endpoint_url=http://127.0.0.1:9000"])
    text = to_yaml(cfg)
    assert "AKIAFAKE" not in text and "s3cr3t" not in text and "http://127.0.0.1:9000" in text


def test_an_output_with_nothing_committed_takes_a_new_fingerprint(tmp_path):
    """A first run that failed before its first commit (say, weights it could not fetch) must not lock
    its output; once a shard is committed, other settings are refused."""
    import pyarrow as pa

    from pipeline.cache import shards
    from pipeline.cache.job import FingerprintMismatch, claim_output
    from pipeline.cache.shards import read_json

    out = str(tmp_path / "cache")
    first = claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}"]), Storage())
    second = claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}", "stride=32"]), Storage())
    assert first["fingerprint"] != second["fingerprint"]
    assert read_json(Storage(), str(tmp_path / "cache" / "teacher.json"))["stride"] == 32
    shards.create_tables(Storage(), out)  # a committed shard (its rows; the tar does not matter here)
    shards._append(Storage(), out, shards.MANIFEST, pa.Table.from_pylist([{"key": "k0", "shard": "s"}],
                                                                         schema=shards.SAMPLE_SCHEMA))
    with pytest.raises(FingerprintMismatch, match="stride"):
        claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}"]), Storage())
    assert read_json(Storage(), str(tmp_path / "cache" / "teacher.json"))["stride"] == 32


def test_paths_are_resolved_on_the_driver(tmp_path, monkeypatch):
    """Relative paths mean the directory the user ran the command from, in every process of the job."""
    from pipeline.evaluate.evaluator import EvalConfig
    from pipeline.evaluate.segment import SegmentConfig
    from pipeline.train.job import TrainConfig

    monkeypatch.chdir(tmp_path)
    (tmp_path / "w.safetensors").write_bytes(b"")
    cache = parse_config(CacheConfig, ["source=imgs", "output=out/cache", "pretrained=w.safetensors"])
    assert (cache.source, cache.output) == (f"{tmp_path}/imgs", f"{tmp_path}/out/cache")
    assert cache.pretrained == f"{tmp_path}/w.safetensors"
    assert parse_config(CacheConfig, []).source == "builtin:samples"
    assert parse_config(CacheConfig, ["pretrained=laion2b_s34b_b88k"]).pretrained == "laion2b_s34b_b88k"
    train = parse_config(TrainConfig, ["cache=out/cache", "deepspeed_config=zero2.json"])
    assert (train.cache, train.output, train.run_dir) == (f"{tmp_path}/out/cache", f"{tmp_path}/out/train",
                                                         f"{tmp_path}/out/train/spar-student")
    assert train.deepspeed_config == f"{tmp_path}/zero2.json" and train.pretrained == "from-cache"
    ev = parse_config(EvalConfig, ["dataset=voc21", "root=data/voc", "checkpoint=./s.safetensors",
                                   "classes=mine.txt"])
    assert (ev.root, ev.checkpoint, ev.classes) == (f"{tmp_path}/data/voc", f"{tmp_path}/s.safetensors",
                                                     f"{tmp_path}/mine.txt")
    seg = parse_config(SegmentConfig, ["image=cat.jpg", "classes=cat, dog", "output=s3://b/seg"])
    assert (seg.image, seg.classes, seg.output) == (f"{tmp_path}/cat.jpg", "cat, dog", "s3://b/seg")
    assert to_yaml(train).count(str(tmp_path)) >= 3  # config.yaml records the resolved form


def test_a_storage_context_applies_its_options_to_object_stores_only():
    from pipeline.storage import Storage

    flat = Storage({"endpoint_url": "http://127.0.0.1:9", "key": "K", "secret": "s3cr3t"})
    assert flat.options_for("s3://b/x")["secret"] == "s3cr3t" and flat.options_for("/local") == {}
    assert flat.options_for("https://example.com/x.jpg") == {}  # not an object store
    per = Storage({"s3": {"key": "K3"}, "gs": {"token": "T"}})
    assert per.options_for("s3a://b/x") == {"key": "K3"} and per.options_for("gcs://b/x") == {"token": "T"}
    assert "s3cr3t" not in repr(flat) and "K3" not in repr(per)
    nested = Storage({"key": "K", "client_kwargs": {"region_name": "eu-west-1"}})  # flat, with a dict inside
    assert nested.options_for("s3://b/x") == {"key": "K", "client_kwargs": {"region_name": "eu-west-1"}}
