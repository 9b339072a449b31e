"""The last facts each provider's discovery returned, so that a dry run can plan offline.

A real run's discovery saves every provider's pools in ``.stowplan/facts/<provider>.json``,
atomically (a temporary file in the same folder, flushed, then renamed over the old one), so a
reader sees the previous facts or the new ones, never half of either. A dry run never writes
here; when a provider cannot be reached it reads the file and says how old the facts are.

A record carries a hash of the provider's configuration: facts discovered for another host, port,
partition list or queue factor describe another cluster, and are not used.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from datetime import datetime
from pathlib import Path

import msgspec

from stowplan.placement.problem import Pool
from stowplan.spec.models import ProviderConfig

FACTS_DIR = "facts"


class FactsRecord(msgspec.Struct, frozen=True, kw_only=True):
    """What ``discover()`` returned for one provider, and when."""

    provider: str
    config_hash: str
    discovered_at: float
    """Unix seconds."""
    pools: list[Pool]

    def when(self) -> str:
        """Local time of the discovery, to the minute (what the dry run prints)."""
        return datetime.fromtimestamp(self.discovered_at).strftime("%Y-%m-%d %H:%M")


_encoder = msgspec.json.Encoder(order="deterministic")
_decoder = msgspec.json.Decoder(FactsRecord)


def facts_path(state_dir: Path, provider: str) -> Path:
    return Path(state_dir) / FACTS_DIR / f"{provider}.json"


def config_hash(config: ProviderConfig) -> str:
    return hashlib.blake2b(_encoder.encode(config), digest_size=16).hexdigest()


def save_facts(
    state_dir: Path,
    provider: str,
    config: ProviderConfig,
    pools: list[Pool],
    *,
    now: float | None = None,
) -> Path:
    """Write ``provider``'s facts atomically; the path written."""
    path = facts_path(state_dir, provider)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = FactsRecord(
        provider=provider,
        config_hash=config_hash(config),
        discovered_at=time.time() if now is None else now,
        pools=list(pools),
    )
    fd, tmp = tempfile.mkstemp(prefix=f".{provider}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(_encoder.encode(record))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_facts(
    state_dir: Path, provider: str, config: ProviderConfig
) -> tuple[FactsRecord | None, str]:
    """The saved facts of ``provider`` if they are usable, else ``None`` and why not."""
    path = facts_path(state_dir, provider)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, f"no facts saved in {path}"
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}"
    try:
        record = _decoder.decode(data)
    except msgspec.DecodeError as e:
        return None, f"{path} is unreadable ({e})"
    if record.provider != provider or record.config_hash != config_hash(config):
        return None, f"{path} was saved for another configuration of {provider!r}"
    return record, ""
