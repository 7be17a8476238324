"""jobs/inspect_cache.py on tiny caches, local and on the S3 server: the summary against the
manifest, the contact sheet's layout and pictures, and the audit that recomputes stored targets."""
from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

import spar
from jobs import cache_teacher, inspect_cache
from pipeline import open_cache, storage
from pipeline.cache import shards
from pipeline.cache.encode import META_EXT, TARGET_EXT, encode_members, image_member
from pipeline.cache.inspect import LABEL, PANEL, pick_samples
from pipeline.codecs import load_npy
from pipeline.storage import Storage
from tests.images import png, scene
from tests.integration.conftest import SharedCache, put_files


def test_the_inspector_summarises_and_draws_a_cache(shared_cache: SharedCache, tmp_path, monkeypatch):
    cache_url = shared_cache.url
    spar.export_open_clip(spar.load_backbone("maskclip-test", pretrained=None, init_seed=3),
                          tmp_path / "student.safetensors")
    monkeypatch.chdir(tmp_path)  # a relative output, as users give it
    with shards.WriterLease(Storage(), cache_url, "job-x"):  # a cache job writing to it meanwhile
        summary = inspect_cache.main([f"cache={cache_url}", "samples=3", "student=student.safetensors",
                                      "output=insp"])
    assert [w["run"] for w in summary["writing_now"]] == ["job-x"]

    cache = open_cache(cache_url)
    n = len(cache)
    assert summary["samples"] == n and summary["shards"] == cache.shards.num_rows
    assert summary["bytes"] == sum(cache.shards.column("bytes").to_pylist())
    sizes = Counter(f"{r['height']}x{r['width']}" for r in cache.manifest.to_pylist())
    assert summary["image_sizes"] == dict(sizes.most_common(10)) and summary["distinct_image_sizes"] == len(sizes)
    assert sum(summary["windows_per_image"].values()) == n
    assert summary["member_bytes_measured_on"] == 3 and summary["fingerprint"]["backbone"] == "maskclip-test"
    assert json.loads((tmp_path / "insp" / "summary.json").read_text())["samples"] == n
    assert f"{n} samples in" in (tmp_path / "insp" / "summary.txt").read_text()
    assert "cache jobs writing to it now: job-x (on " in (tmp_path / "insp" / "summary.txt").read_text()

    sheet = np.asarray(Image.open(tmp_path / "insp" / "contact_sheet.png").convert("RGB")).astype(float)
    assert sheet.shape == (LABEL + 3 * (PANEL + LABEL), 4 * PANEL, 3)  # 3 rows: image, teacher, single, student
    for r in range(3):
        y = LABEL + r * (PANEL + LABEL) + LABEL
        for c in range(1, 4):  # every feature panel is a picture, not a flat colour
            assert sheet[y:y + PANEL, c * PANEL:(c + 1) * PANEL].std() > 10, (r, c)
    rows = summary["contact_sheet"]["rows"]
    assert len(rows) == 3 and all(r["single_pass_mse"] > 0 and r["student_mse"] > 0 for r in rows)


def _same_size_cache(root) -> str:
    """Three images of one size, augmented without randomness: every target has the same grid."""
    put_files(str(root / "src"), {f"s{i}.png": png(scene(160, 224, seed=40 + i)) for i in range(3)})
    out = str(root / "cache")
    cache_teacher.main(["backbone=maskclip-test", "augment.scale=[224,160]", "augment.min_side=64",
                        "augment.keep_prob=1", "augment.flip_prob=0", "augment.ratio_range=[1,1]",
                        f"source={root / 'src'}", f"output={out}"])
    return out


@pytest.mark.slow
def test_the_audit_passes_on_an_intact_cache_and_names_a_swapped_target(ray_cluster, tmp_path, caplog):
    intact = _same_size_cache(tmp_path)
    summary = inspect_cache.main([f"cache={intact}", "samples=3", "recompute=3", f"output={tmp_path / 'a'}"])
    assert len(summary["audit"]) == 3 and all(r["ok"] for r in summary["audit"])
    assert max(r["relative_l2"] for r in summary["audit"]) < 1e-3  # float16 rounding of the same features

    # A copy in which one sample carries another image's target, re-encoded with valid checksums.
    cache = open_cache(intact)
    raws = sorted(pick_samples(cache, 3, seed=0), key=lambda r: r["__key__"])
    victim, donor = raws[1]["__key__"], raws[0]["__key__"]
    tampered = str(tmp_path / "tampered")
    shards.write_json(Storage(), storage.join(tampered, "teacher.json"), cache.fingerprint)
    shards.create_tables(Storage(), tampered)
    members, rows = [], []
    manifest = {r["key"]: r for r in cache.manifest.to_pylist()}
    for raw in raws:
        target = load_npy(raws[0][TARGET_EXT] if raw["__key__"] == victim else raw[TARGET_EXT])
        meta = json.loads(raw[META_EXT])
        m = encode_members(raw["__key__"], image_member(raw)[1], image_member(raw)[0], {"target": target}, meta)
        meta = json.loads(m[META_EXT])
        row = manifest[raw["__key__"]]
        rows.append({k: row[k] for k in ("key", "source", "view", "height", "width", "grid_h", "grid_w", "windows")}
                    | {"target_bytes": len(m[TARGET_EXT]), "image_checksum": meta["image_checksum"],
                       "target_checksum": meta["target_checksum"]})
        members.append(m)
    shards.commit_shard(Storage(), tampered, members, rows, run="tamper")
    assert open_cache(tampered).verify() == []  # every file hash and checksum is valid
    with pytest.raises(SystemExit) as failed:
        inspect_cache.main([f"cache={tampered}", "samples=3", "recompute=3", f"output={tmp_path / 'b'}"])
    assert failed.value.code != 0 and victim in caplog.text and "beyond their bound" in caplog.text
    audit = {r["key"]: r for r in json.loads((tmp_path / "b" / "audit.json").read_text())}
    assert not audit[victim]["ok"] and audit[victim]["relative_l2"] > 0.1
    assert all(r["ok"] for k, r in audit.items() if k != victim) and donor != victim
