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


SECRET = "Sup3rS3cr3t"  # every credential below holds it; no saved or printed form of the config may
SECRET_OPTIONS = {  # the credential options of each backend, as a user would pass them on the command line
    "s3fs": ["storage_options.key=AKIA" + SECRET, "storage_options.secret=" + SECRET,
             "storage_options.token=" + SECRET, "storage_options.client_kwargs.aws_access_key_id=AKIA" + SECRET,
             "storage_options.client_kwargs.aws_secret_access_key=" + SECRET,
             "storage_options.client_kwargs.aws_session_token=" + SECRET, "storage_options.s3.session_token=" + SECRET],
    "gcsfs": ["storage_options.gs.token=/secrets/" + SECRET + ".json"],
    "gcsfs-dict": ["storage_options.gs.token.type=service_account",
                   "storage_options.gs.token.private_key=-----BEGIN PRIVATE KEY-----" + SECRET,
                   "storage_options.gs.token.client_email=" + SECRET + "@p.iam.gserviceaccount.com"],
    "adlfs": ["storage_options.abfs.account_name=acct", "storage_options.abfs.account_key=" + SECRET,
              "storage_options.abfs.sas_token=sv=2024&sig=" + SECRET, "storage_options.abfs.client_secret=" + SECRET,
              "storage_options.abfs.credential=" + SECRET,
              "storage_options.az.connection_string=DefaultEndpointsProtocol=https;AccountKey=" + SECRET],
    "http": ["storage_options.https.headers.Authorization=Bearer " + SECRET,
             "storage_options.https.headers.Cookie=session=" + SECRET,
             "storage_options.https.headers.X-Api-Key=" + SECRET,
             "storage_options.https.headers.X-Custom=" + SECRET,  # any header may carry a credential
             "storage_options.https.client_kwargs.auth=[user," + SECRET + "]"],
    "delta-rs": ["storage_options.aws_secret_access_key=" + SECRET, "storage_options.azure_storage_account_key=" + SECRET,
                 "storage_options.azure_storage_sas_key=" + SECRET,
                 "storage_options.google_service_account_key=" + SECRET, "storage_options.password=" + SECRET,
                 "storage_options.api_key=" + SECRET],
    "urls": ["pretrained=s3://b/backbone.pth,https://user:" + SECRET + "@host/w.pth?sig=" + SECRET,
             "source=https://bucket.s3.amazonaws.com/list.txt?X-Amz-Credential=AKIA" + SECRET
             + "&X-Amz-Signature=" + SECRET, "output=az://c/cache?sv=2024&sig=" + SECRET,
             "storage_options.endpoint_url=https://minio:" + SECRET + "@minio.internal:9000"],
}


@pytest.mark.parametrize("backend", sorted(SECRET_OPTIONS))
def test_no_backends_credentials_reach_a_saved_or_printed_config(backend):
    """The secret option names of s3fs, gcsfs, adlfs, HTTP headers and delta-rs, and credentials in
    URLs (user info, pre-signed query strings), in every form a job writes or prints its config."""
    import json

    from pipeline.config import to_dict
    from pipeline.train.job import TrainConfig

    for schema, required in ((CacheConfig, ["backbone=maskclip-test"]), (TrainConfig, ["cache=s3://b/c"])):
        argv = [*required, *(a for a in SECRET_OPTIONS[backend]
                             if schema is CacheConfig or not a.startswith(("source=", "pretrained=")))]
        cfg = parse_config(schema, argv)
        assert SECRET in repr(cfg.storage_options) or SECRET in str(vars(cfg))  # the job itself has them
        for shown in (to_yaml(cfg), json.dumps(to_dict(cfg)), repr(cfg), str(cfg), f"{cfg!r}"):
            assert SECRET not in shown, (backend, shown)
        assert "<redacted>" in to_yaml(cfg) or backend == "urls"


def test_redaction_keeps_what_is_not_a_secret():
    """Endpoints, regions, account and container names, and every default key stay readable (a
    fingerprint records `to_dict` of the augmentation: nothing of it may change)."""
    from pipeline.config import redact, to_dict
    from pipeline.train.job import TrainConfig

    options = {"endpoint_url": "http://127.0.0.1:9000", "client_kwargs": {"region_name": "eu-west-1"},
               "account_name": "acct", "anon": False, "profile": "research", "requester_pays": True,
               "headers": {"Authorization": "Bearer x"}}
    shown = redact(options)
    assert {k: v for k, v in shown.items() if k != "headers"} == {k: v for k, v in options.items() if k != "headers"}
    assert shown["headers"] == {"Authorization": "<redacted>"}
    assert redact("abfs://container@acct.dfs.core.windows.net/w.pth") == "abfs://container@acct.dfs.core.windows.net/w.pth"
    for schema, argv in ((CacheConfig, []), (TrainConfig, ["cache=s3://b/c"])):
        assert "<redacted>" not in str(to_dict(parse_config(schema, argv)))


def test_storage_options_from_a_file_or_the_environment(tmp_path, monkeypatch):
    """Two ways to keep credentials off the command line (and out of `ps` and the Ray job's
    entrypoint): a YAML file given like a preset, and ``${oc.env:VAR}`` interpolation."""
    creds = tmp_path / "storage.yaml"
    creds.write_text(f"storage_options:\n  account_name: acct\n  account_key: {SECRET}\n")
    monkeypatch.setenv("SPAR_TEST_SAS", "sig=" + SECRET)
    cfg = parse_config(CacheConfig, [str(creds), "storage_options.sas_token=${oc.env:SPAR_TEST_SAS}"])
    assert cfg.storage_options == {"account_name": "acct", "account_key": SECRET, "sas_token": "sig=" + SECRET}
    assert SECRET not in to_yaml(cfg)
    with pytest.raises(ConfigError, match="SPAR_NOT_SET.*storage_options.secret"):
        parse_config(CacheConfig, ["storage_options.secret=${oc.env:SPAR_NOT_SET}"])


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


def test_the_readmes_mixture_command_parses_and_relative_caches_resolve(tmp_path, monkeypatch):
    """The README's mixture example, as a shell splits it; a list of relative caches from a fresh
    directory; and the combinations the job refuses, naming the key."""
    import shlex
    from pathlib import Path

    from pipeline.train.job import TrainConfig

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("**Mixtures of caches.**", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    words = shlex.split(block.replace("\\\n", " "))
    assert words[:2] == ["python", "jobs/train_student.py"]
    cfg = parse_config(TrainConfig, words[2:])
    assert cfg.cache == ["s3://bucket/caches/sa1b-s24", "s3://bucket/caches/aerial-s24"]
    assert cfg.mix == [0.8, 0.2] and cfg.epoch_samples == 1_000_000
    assert cfg.mixture() == {"caches": cfg.cache, "mix": [0.8, 0.2], "epoch_samples": 1_000_000}

    monkeypatch.chdir(tmp_path)
    cfg = parse_config(TrainConfig, ["cache=[out/a,out/b]"])
    assert cfg.cache == [str(tmp_path / "out/a"), str(tmp_path / "out/b")] and cfg.mix is None
    assert parse_config(TrainConfig, ["cache=out/a"]).mixture() is None  # one cache: nothing to pin
    for argv, msg in ((["cache=[out/a,out/b]", "mix=[1]"], "one weight >= 0 per cache"),
                      (["cache=out/a", "epoch_samples=5"], "epoch_samples needs mix="),
                      (["cache=[out/a,out/a]"], "names a cache twice")):
        with pytest.raises(ConfigError, match=msg):
            parse_config(TrainConfig, argv)
