"""Credentials given to a job, on the command line, in a YAML file or through the environment, reach
no file it writes and no line it logs."""
from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from jobs import cache_teacher
from tests.integration.conftest import SharedCache


def test_credentials_reach_no_file_and_no_log_line(local_cache: SharedCache, tmp_path, monkeypatch, caplog, capsys):
    """The cache job rerun on a copy of the session's local cache (every sample is committed, so it
    only claims the output, writes its configs and summary: about a second) with the secret options
    of s3fs, gcsfs, adlfs and HTTP. A local output never receives them, so the run succeeds."""
    secret = uuid.uuid4().hex
    output = tmp_path / "cache"
    shutil.copytree(local_cache.url, output)
    creds = tmp_path / "storage.yaml"  # beside the output, as a mounted secret would be
    creds.write_text(f"storage_options:\n  account_name: acct\n  account_key: {secret}\n"
                     f"  connection_string: DefaultEndpointsProtocol=https;AccountKey={secret}\n"
                     f"  headers:\n    Authorization: Bearer {secret}\n")
    monkeypatch.setenv("SPAR_TEST_SAS_TOKEN", f"sv=2024&sig={secret}")
    summary = cache_teacher.main(local_cache.argv(
        str(creds), f"storage_options.key=AKIA{secret}", f"storage_options.secret={secret}",
        f"storage_options.token={secret}", f"storage_options.client_secret={secret}",
        "storage_options.sas_token=${oc.env:SPAR_TEST_SAS_TOKEN}", output=str(output)))
    assert summary["computed"] == 0 and summary["committed_total"] == len(local_cache.files)
    config = (output / "config.yaml").read_text()
    assert "account_name: acct" in config and "account_key: <redacted>" in config  # the options did arrive
    written = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.parent.parent.name == "runs" and p.name == "config.yaml" for p in written)
    assert any(p.name == "summary.json" for p in written) and any(p.name == "teacher.json" for p in written)
    leaked = [str(p.relative_to(output)) for p in written if secret.encode() in p.read_bytes()]
    assert leaked == []
    out, err = capsys.readouterr()
    assert caplog.text and secret not in caplog.text + out + err
