"""Resolve a `pretrained=` value to something open_clip can load, failing fast when offline.

A value is one of:
* ``None`` -- random initialisation;
* an open_clip pretrained tag (``laion2b_s34b_b88k``) -- fetched from the HF hub by open_clip;
* a local file path (``/w/model.safetensors``, ``file:///w/model.bin``);
* an fsspec URL (``s3://bucket/model.safetensors``) -- copied once into a local cache dir;
* for backbones that are not open_clip models (``dinov3txt``, ``timm:<name>``): a comma-separated
  list of such files (``backbone.pth,dinotxt.pth``), or ``timm`` (timm's own pretrained weights).

Files that are not open_clip's are read with `read_state_dict`: safetensors, or ``torch.load`` with
``weights_only=True`` (never unpickling code).
"""
from __future__ import annotations

import hashlib
import logging
import os
import socket
import urllib.parse
from pathlib import Path
from typing import IO, Callable, Collection


log = logging.getLogger(__name__)

TIMM_DEFAULT = "timm"  # pretrained= value for a `timm:` backbone's own weights (its pretrained_cfg, via the HF hub)
USER_SUPPLIED = "default"  # default_pretrained of gated backbones: there is nothing to download

OFFLINE_HELP = (
    "Offline options: pass pretrained=None for random initialisation, or pretrained=<path or URL> "
    "to a weights file you already have (a local path, file://, or an fsspec URL such as s3://bucket/w.safetensors)."
)


def _is_url(value: str) -> bool:
    scheme = urllib.parse.urlparse(value).scheme
    return len(scheme) > 1  # a Windows drive letter is not a scheme


def public_url(url: str | None) -> str | None:
    """A URL without query string or user info (signed URLs and ``https://user:password@`` carry
    credentials there): what may be logged or recorded. The fragment stays: it names a member inside
    an archive (``s3://b/p.tar#img.jpg``). Azure's ``abfs://container@account...`` keeps its container
    (no password there). A comma-separated list of URLs (``pretrained=a,b``) is cleaned URL by URL."""
    if not url or "://" not in str(url):
        return url
    url = str(url)
    if url.count("://") > 1 and "," in url:
        return ",".join(public_url(part) for part in url.split(","))
    p = urllib.parse.urlparse(url)
    user, at, host = p.netloc.rpartition("@")
    if at and p.scheme in _USER_IS_CONTAINER and ":" not in user:
        host = p.netloc
    return urllib.parse.urlunparse((p.scheme, host, p.path, "", "", p.fragment))


_USER_IS_CONTAINER = ("abfs", "abfss", "az", "wasb", "wasbs")  # scheme://<container>@<account host>/path


def _unknown_weights(model_name: str, pretrained: str) -> FileNotFoundError:
    import open_clip

    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return FileNotFoundError(
        f"pretrained={public_url(pretrained)!r} is neither an open_clip tag of {model_name} (known: {tags}) nor an "
        f"existing file. " + OFFLINE_HELP
    )


def _weights_cache_dir() -> Path:
    root = os.environ.get("SPAR_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "spar")
    return Path(root) / "weights"


class WeightsMismatch(ValueError):
    """A weights file whose sha256 is not the one recorded for it: the file was replaced since."""


def _open_with_fsspec(url: str, storage_options: dict | None) -> IO[bytes]:
    import fsspec  # only needed for remote weights; keeps the library import light

    return fsspec.open(url, "rb", **(storage_options or {})).open()


_remote_reader: Callable[[str, dict | None], IO[bytes]] = _open_with_fsspec


def use_remote_reader(open_remote: Callable[[str, dict | None], IO[bytes]]) -> None:
    """Open remote weight files with ``open_remote(url, storage_options)`` (a binary file object)
    from now on, instead of a plain ``fsspec.open``: how a data pipeline brings its own retries (the
    project's storage layer installs one that retries transient faults and resumes a download cut
    mid-way at its byte offset)."""
    global _remote_reader
    _remote_reader = open_remote


def _fetch_url(url: str, storage_options: dict | None = None, accept: Collection[str] = ()) -> str:
    """Copy a remote weights file to the local cache and return its local path. The copy is keyed
    by the whole URL, and fetched with it: a pre-signed URL's query string is its credential
    (only logs show `public_url`). `storage_options` are the fsspec options of the URL's filesystem.

    With `accept` (``sha256:<hex>`` digests), a local copy that is none of them (stale or corrupt) is
    fetched again, once; a fresh copy that is none of them either is refused (`WeightsMismatch`) and
    not kept: the file at the URL is not the one recorded."""
    return _fetch_checked(url, storage_options, accept)[0]


def _fetch_checked(url: str, storage_options: dict | None, accept: Collection[str]) -> tuple[str, str | None]:
    """`_fetch_url`, and the digest of the file when it was computed (with `accept`), else None."""
    if url.startswith("file://"):
        return _check_local(urllib.parse.urlparse(url).path, url, accept)
    name = Path(urllib.parse.urlparse(url).path).name or "weights.bin"
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    local = _weights_cache_dir() / key / name
    if local.is_file():
        if not accept:
            return str(local), None
        found = _file_digest(str(local))
        if found in accept:
            return str(local), found
        log.warning("the local copy %s of %s is %s, not the expected %s: fetching it again", local,
                    public_url(url), found, " or ".join(sorted(accept)))
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(local.name + f".part{os.getpid()}")
    log.info("fetching weights %s -> %s", public_url(url), local)
    digest = hashlib.sha256()
    try:
        with _remote_reader(url, storage_options) as src, open(tmp, "wb") as dst:
            while chunk := src.read(16 << 20):
                dst.write(chunk)
                digest.update(chunk)
    except Exception as e:
        tmp.unlink(missing_ok=True)
        if public_url(url) == url:
            raise
        raise _without_credentials(e, url) from None
    found = f"sha256:{digest.hexdigest()}"
    if accept and found not in accept:
        tmp.unlink()
        raise _mismatch(url, accept, found, fresh=True)
    os.replace(tmp, local)  # atomic: concurrent fetchers never see a partial file
    return str(local), found


def _without_credentials(error: Exception, url: str) -> OSError:
    """`error` of fetching `url`, retold without the URL's query string and user info (HTTP errors
    quote the whole URL: an expired pre-signed URL would put its signature in the job's log)."""
    text = str(error)
    parsed = urllib.parse.urlparse(url)
    for secret in (parsed.query, parsed.netloc.rpartition("@")[0]):
        if secret:
            text = text.replace(secret, "<redacted>")
    kind = FileNotFoundError if isinstance(error, FileNotFoundError) else OSError
    return kind(f"cannot fetch weights {public_url(url)}: {type(error).__name__}: {text}")


def _check_local(path: str, shown: str, accept: Collection[str]) -> tuple[str, str | None]:
    """A local weights file, refused if `accept` is given and its digest is not in it."""
    if not accept:
        return path, None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights {public_url(shown)!r}: no such file on this node "
                                f"(expected {' or '.join(sorted(accept))})")
    found = _file_digest(path)
    if found not in accept:
        raise _mismatch(shown, accept, found, fresh=False)
    return path, found


def _mismatch(url: str, accept: Collection[str], found: str, *, fresh: bool) -> WeightsMismatch:
    why = ("downloaded just now, so not a stale local copy: the file at that URL was replaced after its digest "
           "was recorded" if fresh else "the file at that path is not the one recorded")
    return WeightsMismatch(f"weights {public_url(url)}: expected {' or '.join(sorted(accept))}, found {found} ({why})")


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    parsed = urllib.parse.urlparse(endpoint)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_hub_file(hf_hub: str) -> str | None:
    """Local path of a tag's weights if the HF cache already holds them."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    repo, filename = os.path.split(hf_hub)
    for name in ([filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]):
        found = try_to_load_from_cache(repo, name)
        if isinstance(found, str):
            return found
    return None


def resolve_pretrained(model_name: str, pretrained: str | None, storage_options: dict | None = None) -> str | None:
    """Turn `pretrained` into a tag or a local file that `open_clip.create_model` loads without waiting
    (a remote file is fetched with `storage_options`, its filesystem's fsspec options).

    Raises ``RuntimeError`` at once (no minute of HTTP retries) when a tag must be downloaded but the
    hub cannot be reached, naming both offline options.
    """
    import open_clip

    if pretrained is None or pretrained == "":
        return None
    pretrained = str(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if tag_cfg:
        if "file" in tag_cfg:
            return pretrained
        hf_hub = tag_cfg.get("hf_hub", "")
        cached = _cached_hub_file(hf_hub) if hf_hub else None
        if cached:
            return cached
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if offline or not _hub_reachable():
            raise RuntimeError(
                f"Cannot fetch open_clip weights '{model_name}' / '{pretrained}': the Hugging Face hub is "
                f"{'disabled (HF_HUB_OFFLINE)' if offline else 'unreachable'} and the weights are not cached. "
                + OFFLINE_HELP
            )
        return pretrained
    if _is_url(pretrained):
        return _fetch_url(pretrained, storage_options)
    if os.path.isfile(pretrained):
        return pretrained
    raise _unknown_weights(model_name, pretrained)


def split_files(pretrained: str) -> list[str]:
    """The files of a ``pretrained=`` value: one, or several separated by commas."""
    return [p.strip() for p in str(pretrained).split(",") if p.strip()]


def resolve_files(pretrained: str | None, storage_options: dict | None = None, what: str = "pretrained") -> list[str]:
    """Local paths of the comma-separated files in `pretrained` (remote ones fetched once into the
    cache); ``[]`` for None. A part that is neither a URL nor an existing file is a FileNotFoundError."""
    if pretrained is None or pretrained == "":
        return []
    out = []
    for part in split_files(pretrained):
        local = _fetch_url(part, storage_options) if _is_url(part) else part
        if not os.path.isfile(local):
            raise FileNotFoundError(f"{what}: {public_url(part)!r} is not an existing file. " + OFFLINE_HELP)
        out.append(local)
    return out


def read_state_dict(path: str) -> dict:
    """A weights file as a dict of tensors: safetensors, or a torch checkpoint loaded with
    ``weights_only=True`` (tensors and plain containers only, never pickled code). A checkpoint that
    wraps its weights in one ``model`` / ``state_dict`` / ``module`` entry is unwrapped."""
    import torch

    with open(path, "rb") as f:
        head = f.read(9)
    if path.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for files that need code to load, zip errors for non-checkpoints
        raise ValueError(f"{path}: not a safetensors file or a weights-only torch checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(state, dict) and len(state) == 1 and next(iter(state)) in ("model", "state_dict", "module"):
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict (a mapping of names to tensors)")
    return state


def _file_digest(local: str) -> str:
    digest = hashlib.sha256()
    with open(local, "rb") as f:
        while chunk := f.read(16 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def _checked_files(pretrained: str, storage_options: dict | None, expected: str) -> list[tuple[str, str]]:
    """(local path, digest) of every file of `pretrained`, each one among the digests of `expected`
    (`weights_identity`'s value: ``sha256:<hex>``, comma-separated and sorted for several files), and
    together exactly those; remote files are fetched into the local cache (again if its copy is stale)."""
    accept = set(expected.split(","))
    files = []
    for part in split_files(pretrained):
        path, found = (_fetch_checked(part, storage_options, accept) if _is_url(part)
                       else _check_local(part, part, accept))
        files.append((path, found))
    found = ",".join(sorted(d for _, d in files))
    if found != expected:  # each file is one of the recorded ones, but not the same set (a file missing or twice)
        raise WeightsMismatch(f"weights {public_url(pretrained)}: expected {expected}, found {found}")
    return files


def verified_weights(pretrained: str | None, identity: dict, storage_options: dict | None = None) -> str | None:
    """What to load for a ``pretrained=`` value whose `identity` (`weights_identity`) was recorded
    earlier (in a cache's fingerprint): for files, their local paths (remote ones fetched once into
    the local cache), each checked against the recorded sha256 on this node, so that every node
    loads the bytes that were recorded. Tags and random inits are returned as they are.

    Raises `WeightsMismatch` naming the URL, the expected and the found digest when a file differs
    (a stale local copy is fetched again first: only a file replaced at its URL is refused)."""
    if identity.get("kind") != "file" or not pretrained:
        return pretrained
    return ",".join(path for path, _ in _checked_files(str(pretrained), storage_options, identity["value"]))


def weights_identity(model_name: str, pretrained: str | None, storage_options: dict | None = None,
                     expected: str | None = None) -> dict:
    """What identifies the weights, for fingerprints: the tag, or the sha256 of the file (of each
    file, sorted, for a comma-separated list). With `expected` (a file identity's value recorded
    before), a stale local copy of a remote file is fetched again and a file that is not the
    recorded one raises `WeightsMismatch`."""
    import open_clip

    if pretrained is None or pretrained == "":
        return {"kind": "random", "value": None}
    if str(pretrained) == TIMM_DEFAULT or open_clip.get_pretrained_cfg(model_name, str(pretrained)):
        return {"kind": "tag", "value": str(pretrained)}
    if str(pretrained) == USER_SUPPLIED:
        raise FileNotFoundError(
            f"pretrained=default: {model_name} has no weights to download (DINOv3's are gated by its licence); "
            "pass the files you have, e.g. dinov3txt: pretrained=<dinov3_vitl16_pretrain_lvd1689m-*.pth>,"
            "<dinov3_vitl16_dinotxt_vision_head_and_text_encoder-*.pth> (local, file:// or s3://)")
    parts = split_files(pretrained)
    if len(parts) == 1 and not _is_url(parts[0]) and not os.path.isfile(parts[0]):
        raise _unknown_weights(model_name, pretrained)
    if expected:
        return {"kind": "file", "value": ",".join(sorted(d for _, d in _checked_files(pretrained, storage_options,
                                                                                       expected)))}
    return {"kind": "file", "value": ",".join(sorted(_file_digest(p) for p in resolve_files(pretrained,
                                                                                          storage_options)))}
