"""`pretrained=` resolution: tags, files, URLs, and a fast, helpful failure offline."""
import time

import pytest
import torch

import spar
from spar.weights import weights_identity


def test_unknown_value_names_offline_options():
    with pytest.raises(FileNotFoundError, match="pretrained=None"):
        spar.load_backbone("maskclip-test", pretrained="no-such-tag-or-file")


@pytest.mark.parametrize("offline", ["1", "0"])
def test_tag_without_network_fails_at_once(monkeypatch, tmp_path, offline):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.monotonic()
    with pytest.raises(RuntimeError) as err:
        spar.load_backbone("maskclip")  # the default tag laion2b_s34b_b88k
    assert time.monotonic() - t < 30
    msg = str(err.value)
    assert "laion2b_s34b_b88k" in msg and "pretrained=None" in msg and "s3://" in msg


def test_local_and_file_url_weights(tmp_path):
    src = spar.load_backbone("maskclip-test", pretrained=None, init_seed=3)
    path = spar.export_open_clip(src, tmp_path / "w.safetensors")
    for value in (str(path), path.as_uri()):
        bb = spar.load_backbone("maskclip-test", pretrained=value)
        assert torch.equal(bb.clip.visual.conv1.weight, src.clip.visual.conv1.weight)


def test_weights_identity(tmp_path):
    assert weights_identity("ViT-B-16", "laion2b_s34b_b88k") == {"kind": "tag", "value": "laion2b_s34b_b88k"}
    assert weights_identity("ViT-B-16", None)["kind"] == "random"
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    ident = weights_identity("ViT-B-16", str(f))
    assert ident == {"kind": "file", "value": "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    with pytest.raises(FileNotFoundError, match="laion2b_s34b_b88k"):  # a typo'd tag lists the known tags
        weights_identity("ViT-B-16", "laion2b_s34b_b88")


def test_signed_weight_urls_are_logged_without_their_secrets(tmp_path, monkeypatch, caplog):
    import logging

    import fsspec

    from spar import weights

    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "cache"))
    data = b"weights bytes"
    url = "memory://bucket/w.safetensors?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIAFAKE"
    with fsspec.open(url, "wb") as f:  # the memory filesystem keeps the query in the path: same object back
        f.write(data)
    with caplog.at_level(logging.INFO, logger="spar.weights"):
        local = weights._fetch_url(url)
    assert open(local, "rb").read() == data
    assert "fetching weights memory://bucket/w.safetensors ->" in caplog.text
    for secret in ("deadbeef", "AKIAFAKE", "X-Amz"):
        assert secret not in caplog.text
