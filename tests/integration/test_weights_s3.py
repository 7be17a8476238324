"""`pretrained=s3://...`: weights come from object storage through fsspec, cached locally once."""
import torch

import spar
from pipeline import storage
from pipeline.storage import Storage
from tests.integration.conftest import make_bucket


def test_load_backbone_from_s3(s3_endpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("SPAR_CACHE_DIR", str(tmp_path / "cache"))
    src = spar.load_backbone("siglip2-test", pretrained=None, init_seed=5)
    local = spar.export_open_clip(src, tmp_path / "w.safetensors")
    url = f"s3://{make_bucket(s3_endpoint)}/weights/w.safetensors"
    Storage().upload(str(local), url)
    bb = spar.load_backbone("siglip2-test", pretrained=url)
    want = src.clip.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in bb.clip.state_dict().items())
    assert len(list((tmp_path / "cache").rglob("w.safetensors"))) == 1
    Storage().remove(url)  # a second load is served from the local copy
    assert torch.equal(spar.load_backbone("siglip2-test", pretrained=url).clip.visual.trunk.pos_embed,
                       src.clip.visual.trunk.pos_embed)
