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
    from pipeline.cache.job import FingerprintMismatch, claim_output
    from pipeline.cache.shards import read_json

    out = str(tmp_path / "cache")
    first = claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}"]), Storage())
    second = claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}", "stride=32"]), Storage())
    assert first["fingerprint"] != second["fingerprint"]
    assert read_json(Storage(), str(tmp_path / "cache" / "teacher.json"))["stride"] == 32
    (tmp_path / "cache" / "manifest" / "shards").mkdir(parents=True)
    (tmp_path / "cache" / "manifest" / "shards" / "shard-0.parquet").write_bytes(b"")  # a committed shard
    with pytest.raises(FingerprintMismatch, match="stride"):
        claim_output(parse_config(CacheConfig, ["backbone=maskclip-test", f"output={out}"]), Storage())
    assert read_json(Storage(), str(tmp_path / "cache" / "teacher.json"))["stride"] == 32
