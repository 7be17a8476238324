"""Typed job configs: a dataclass schema, merged with an optional YAML preset and CLI dotlist.

    cfg = parse_config(CacheConfig, ["extended", "stride=32", "output=s3://b/cache"])

Unknown keys and ill-typed values are errors (OmegaConf struct mode), never silently ignored.
A preset is a YAML path (local or fsspec URL) or the name of a file in `pipeline/presets/`.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from spar.weights import public_url

T = TypeVar("T")
PRESET_DIR = Path(__file__).parent / "presets"
# Option names whose values are credentials, in any backend: s3fs (key, secret, token,
# client_kwargs.aws_secret_access_key / aws_session_token), gcsfs (token: a dict of credentials or a
# path to one), adlfs (account_key, connection_string, sas_token, client_secret, credential), HTTP
# (Authorization, Cookie, X-Api-Key), delta-rs / object_store (aws_secret_access_key,
# azure_storage_account_key, azure_storage_sas_key, google_service_account_key), and the usual
# password / api_key / private_key. Matched anywhere in a config, at any depth.
_SECRET_KEY = re.compile(
    r"secret|token|passw(or)?d|credential|session|private|signature|cookie|authoriz|connection_?string"
    r"|(^|[_-])(api[_-]?)?key$|^apikey$|access_?key|account_?key|^auth$|^sig$|^sas", re.I)
_HEADERS = re.compile(r"^(headers|http_headers|default_headers)$", re.I)  # every HTTP header value may be a credential
REDACTED = "<redacted>"


class ConfigError(ValueError):
    """A config that cannot be parsed or fails its checks; the message says which key."""


def _load_preset(arg: str):
    path = Path(arg)
    if not path.suffix and (PRESET_DIR / f"{arg}.yaml").is_file():
        path = PRESET_DIR / f"{arg}.yaml"
    if path.is_file():
        return OmegaConf.load(path)
    if "://" in arg:  # read before the config (and its storage_options) exists: standard credentials
        from pipeline.storage import Storage

        return OmegaConf.create(Storage().read_text(arg))
    known = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    raise ConfigError(f"argument {arg!r} is neither key=value, a YAML file, nor a preset ({known})")


def parse_config(schema: type[T], argv: Sequence[str] | None = None) -> T:
    """Schema defaults <- presets (in order) <- ``key=value`` overrides -> a checked `schema` instance."""
    argv = list(argv or [])
    presets = [a for a in argv if "=" not in a]
    overrides = [a for a in argv if "=" in a]
    try:
        cfg = OmegaConf.structured(schema)
        for preset in presets:
            cfg = OmegaConf.merge(cfg, _load_preset(preset))
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
        return OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0] + f" (full key: {getattr(e, 'full_key', '?')})") from None
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None


def redact(value: Any) -> Any:
    """A copy with every value under a secret-looking key (`_SECRET_KEY`) or in a mapping of HTTP
    headers replaced by ``"<redacted>"``, and URLs without their query string or user info (where
    signed URLs and ``https://user:password@`` keep their credentials)."""
    if isinstance(value, dict):
        return {k: (REDACTED if _is_secret(k, v) else
                    {h: REDACTED for h in v} if _HEADERS.match(str(k)) and isinstance(v, dict) else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return public_url(value)
    return value


def _is_secret(key: Any, value: Any) -> bool:
    return bool(_SECRET_KEY.search(str(key))) and value not in (None, "") and not isinstance(value, bool)


def redacted_repr(cfg: Any) -> str:
    """``Schema(key=value, ...)`` of a config dataclass without its secrets: the ``__repr__`` of
    every job schema, so that a config printed in a log, a traceback or Ray's state (which shows the
    training loop's config) does not show its `storage_options`."""
    return f"{type(cfg).__name__}({', '.join(f'{k}={v!r}' for k, v in to_dict(cfg).items())})"


def to_dict(cfg: Any) -> dict:
    """A plain, secret-free dict of a config dataclass (for YAML, JSON and fingerprints)."""
    return redact(dataclasses.asdict(cfg))


def to_yaml(cfg: Any) -> str:
    """The resolved, secret-free config as YAML."""
    return OmegaConf.to_yaml(OmegaConf.create(to_dict(cfg)))


def resolve_paths(cfg: Any, *names: str) -> None:
    """Make the named location fields of `cfg` absolute (local) in place, so they mean the same in
    every process of the job whatever its working directory (call from ``__post_init__``)."""
    from pipeline.storage import resolve

    for name in names:
        setattr(cfg, name, resolve(getattr(cfg, name)))


def resolve_weights(value: str | None) -> str | None:
    """A ``pretrained`` / ``checkpoint`` value with local file paths made absolute; open_clip tags,
    ``default``, URLs and null are kept. A comma-separated list of files (``dinov3txt``: backbone and
    dino.txt) is resolved file by file."""
    import os

    from pipeline.storage import is_local, resolve

    if value and "," in value:
        return ",".join(resolve_weights(part.strip()) for part in value.split(",") if part.strip())
    if not value or not is_local(value):
        return value
    looks_like_path = os.sep in value or value.startswith(("~", ".", "file:")) or os.path.exists(value)
    return resolve(value) if looks_like_path else value


def check(condition: bool, message: str) -> None:
    """Raise `ConfigError(message)` unless `condition` (for schema ``__post_init__`` checks)."""
    if not condition:
        raise ConfigError(message)
