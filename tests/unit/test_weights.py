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


def _digest(data: bytes) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(data).hexdigest()


def _put(url: str, data: bytes) -> None:
    import fsspec

    with fsspec.open(url, "wb") as f:
        f.write(data)


def test_a_remote_file_is_loaded_only_with_its_recorded_digest(tmp_path, monkeypatch, caplog):
    """A stale or damaged local copy is fetched again; a file replaced at its URL is refused, naming
    the URL and both digests, on a node without a copy; a node holding the recorded bytes uses them."""
    import logging
    import uuid
    from pathlib import Path

    from spar.weights import WeightsMismatch, verified_weights

    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-a"))
    url = f"memory://bucket-{uuid.uuid4().hex[:8]}/w.safetensors"  # fsspec's memory filesystem: a bucket
    _put(url, b"recorded weights")
    recorded = {"kind": "file", "value": _digest(b"recorded weights")}
    local = verified_weights(url, recorded)
    assert Path(local).read_bytes() == b"recorded weights"
    Path(local).write_bytes(b"a damaged copy")
    with caplog.at_level(logging.WARNING, logger="spar.weights"):
        assert verified_weights(url, recorded) == local
    assert Path(local).read_bytes() == b"recorded weights" and "fetching it again" in caplog.text
    _put(url, b"other weights")  # replaced at the same URL after it was recorded
    assert Path(verified_weights(url, recorded)).read_bytes() == b"recorded weights"
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-b"))  # a node that has no copy yet
    with pytest.raises(WeightsMismatch) as err:
        verified_weights(url, recorded)
    assert url in str(err.value) and recorded["value"] in str(err.value) and _digest(b"other weights") in str(err.value)
    assert not [p for p in (tmp_path / "node-b").rglob("*") if p.is_file()]  # the refused file is not kept
    Path(local).write_bytes(b"a damaged copy")  # node a, once its copy is damaged: fetched again, then refused
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "node-a"))
    with pytest.raises(WeightsMismatch, match=_digest(b"other weights")):
        verified_weights(url, recorded)


def test_local_files_and_file_lists_are_checked_too(tmp_path):
    from spar.weights import WeightsMismatch, verified_weights

    a, b = tmp_path / "backbone.pth", tmp_path / "dinotxt.pth"
    a.write_bytes(b"backbone")
    b.write_bytes(b"text head")
    both = f"{a},{b}"
    recorded = weights_identity("ViT-B-16", both)
    assert recorded["value"] == ",".join(sorted([_digest(b"backbone"), _digest(b"text head")]))
    assert verified_weights(both, recorded) == both
    b.write_bytes(b"another text head")
    with pytest.raises(WeightsMismatch, match=f"{b}: expected .*found {_digest(b'another text head')}"):
        verified_weights(both, recorded)
    with pytest.raises(WeightsMismatch, match="expected"):  # one recorded file twice is not the pair
        verified_weights(f"{a},{a}", recorded)
    assert verified_weights("laion2b_s34b_b88k", {"kind": "tag", "value": "laion2b_s34b_b88k"}) == "laion2b_s34b_b88k"
    assert verified_weights(None, {"kind": "random", "value": None}) is None


def test_a_presigned_url_is_fetched_with_its_query_string(tmp_path, monkeypatch, caplog):
    """The signature in the query string is what lets the download through; only the logs (and
    anything recorded) drop it."""
    import logging
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from spar.weights import verified_weights

    data = b"signed weights"

    class Signed(BaseHTTPRequestHandler):
        def do_GET(self, body=True):
            if "X-Amz-Signature=s1gnature" not in self.path:
                self.send_error(403)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def do_HEAD(self):
            self.do_GET(body=False)

        def log_message(self, *args):
            pass

    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "cache"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Signed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/w.safetensors"
        with pytest.raises(FileNotFoundError) as err:  # the server checks the signature; the error hides it
            verified_weights(f"{url}?X-Amz-Signature=expired", {"kind": "file", "value": _digest(data)})
        assert url in str(err.value) and "expired" not in str(err.value)
        signed = f"{url}?X-Amz-Credential=AKIAFAKE&X-Amz-Signature=s1gnature"
        with caplog.at_level(logging.INFO, logger="spar.weights"):
            local = verified_weights(signed, {"kind": "file", "value": _digest(data)})
    finally:
        server.shutdown()
    assert open(local, "rb").read() == data
    assert f"fetching weights {url} ->" in caplog.text and "s1gnature" not in caplog.text
