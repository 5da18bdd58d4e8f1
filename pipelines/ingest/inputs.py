"""Which crawl files to read: paths, globs, directories, URLs and Common Crawl `*.paths` listings,
how to open them (local or through fsspec), and what their failures mean to a user (InputError)
or to the orchestrator (TransientError: retry)."""

from __future__ import annotations

import gzip
import os
import re
import zlib
from typing import Any, BinaryIO

from pipelines.common import InputError, KilnError, TransientError
from pipelines.ingest.config import IngestConfig

WARC_NAME = re.compile(r"\.(warc|wet|wat)(\.gz)?$", re.IGNORECASE)
LISTING_NAME = re.compile(r"paths(\.txt)?(\.gz)?$", re.IGNORECASE)
GLOB_CHARS = re.compile(r"[*?\[]")


def expand_inputs(config: IngestConfig) -> list[str]:
    """`config.inputs` as crawl file locations, deduplicated, capped at `limit_files`.
    Raises InputError for a missing path, a glob that matches nothing, a bad listing."""
    files = [url for spec in config.inputs for url in expand_input(spec, config)]
    return list(dict.fromkeys(files))[: config.limit_files]


def describe_sources(config: IngestConfig) -> list[list]:
    """What identifies the crawl files right now, for the fingerprint, without one sequential
    metadata call per file: a `*.paths` listing by the sha256 of its own content (Common Crawl's
    files never change once listed); local files by size and modification time; other remote
    files by size and ETag / Last-Modified, asked for in parallel."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    described: list[list] = []
    remote: list[str] = []
    for spec in config.inputs:
        location = spec.strip().removeprefix("file://")
        if is_listing(location) and not GLOB_CHARS.search(location):
            content = _read_all(location if "://" in location else os.path.abspath(os.path.expanduser(location)),
                                config)
            described.append(["listing", location, hashlib.sha256(content).hexdigest(), config.limit_files,
                              config.paths_base_url])
            continue
        for url in expand_input(spec, config):
            if "://" in url:
                described.append([url])
                remote.append(url)
            else:
                stat = os.stat(url)
                described.append([url, stat.st_size, stat.st_mtime_ns])
    with ThreadPoolExecutor(max_workers=32) as pool:
        infos = dict(zip(remote, pool.map(lambda url: _remote_identity(url, config), remote)))
    return [[entry[0], *infos[entry[0]]] if len(entry) == 1 else entry for entry in described]


def _remote_identity(url: str, config: IngestConfig) -> list:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **fs_options(url, config.storage_options, config.timeout_s))
        info = fs.info(path)
        return [info.get("size"), info.get("ETag") or info.get("LastModified") or info.get("mtime")]
    except Exception:  # noqa: BLE001 - unreachable now: the build itself reports it properly
        return [None, None]


def expand_input(spec: str, config: IngestConfig) -> list[str]:
    """One `inputs` entry -> crawl file locations (absolute local paths or URLs)."""
    spec = spec.strip()
    if not spec:
        raise InputError("ingest: an empty string in `inputs`")
    if spec.startswith("file://"):
        spec = spec[len("file://"):]
    remote = "://" in spec
    if GLOB_CHARS.search(spec):
        matches = _glob_remote(spec, config) if remote else sorted(
            os.path.abspath(p) for p in _glob_local(spec) if os.path.isfile(p))
        if not matches:
            raise InputError(f"{spec}: the glob matches no file")
        return [url for match in matches for url in (read_listing(match, config) if is_listing(match) else [match])]
    if remote:
        return read_listing(spec, config) if is_listing(spec) else [spec]
    path = os.path.abspath(os.path.expanduser(spec))
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if WARC_NAME.search(name))
        if not files:
            raise InputError(f"{spec}: the directory holds no .warc/.warc.gz files")
        return files
    if not os.path.exists(path):
        raise InputError(f"{spec}: no such file")
    return read_listing(path, config) if is_listing(path) else [path]


def _glob_local(pattern: str) -> list[str]:
    import glob

    return glob.glob(os.path.expanduser(pattern), recursive=True)


def _glob_remote(pattern: str, config: IngestConfig) -> list[str]:
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(pattern, **fs_options(pattern, config.storage_options, config.timeout_s))
        return sorted(fs.unstrip_protocol(p) for p in fs.glob(path))
    except Exception as err:
        raise remote_error(pattern, err) from None


def is_listing(location: str) -> bool:
    return bool(LISTING_NAME.search(location.rsplit("/", 1)[-1])) and not WARC_NAME.search(location)


def _read_all(location: str, config: IngestConfig) -> bytes:
    try:
        with open_input(location, config.storage_options, config.timeout_s) as handle:
            return handle.read()
    except KilnError:
        raise
    except Exception as err:
        raise remote_error(location, err) from None


def read_listing(location: str, config: IngestConfig) -> list[str]:
    """A Common Crawl `warc.paths.gz`: one path per line, relative to `paths_base_url`."""
    data = _read_all(location, config)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise InputError(f"{location}: a broken gzip listing ({err})") from None
    base = config.paths_base_url.rstrip("/") + "/"
    urls = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line or line.startswith("/"):
            urls.append(line)
        else:
            urls.append(base + line.lstrip("/"))
        if config.limit_files is not None and len(urls) >= config.limit_files:
            break  # listings name tens of thousands of files
    if not urls:
        raise InputError(f"{location}: the listing names no files")
    return urls


def fs_options(url: str, storage_options: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    options = dict(storage_options)
    if url.startswith(("http://", "https://")) and "client_kwargs" not in options:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        options["client_kwargs"] = {"timeout": timeout}
    return options


def open_input(location: str, storage_options: dict[str, Any], timeout_s: float) -> BinaryIO:
    if "://" not in location:
        try:
            return open(location, "rb")
        except FileNotFoundError:
            raise InputError(f"{location}: no such file") from None
        except OSError as err:
            raise InputError(f"{location}: cannot be read ({err.strerror or err})") from None
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(location, **fs_options(location, storage_options, timeout_s))
        if location.startswith(("http://", "https://")):
            return fs.open(path, "rb", block_size=0)  # stream it; no range requests
        return fs.open(path, "rb", block_size=8 << 20, cache_type="readahead")
    except Exception as err:
        raise remote_error(location, err) from None


def remote_error(location: str, err: BaseException, reading: bool = False) -> KilnError:
    """A network or storage failure as InputError (will fail again) or TransientError (may pass)."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and len(chain) < 10:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in chain:
        status = getattr(cause, "status", None) or getattr(cause, "status_code", None)
        if isinstance(status, int) and status >= 400:
            if status >= 500 or status in (408, 425, 429):
                return TransientError(f"{location}: HTTP {status}; may pass, retry later")
            reason = {401: "access denied", 403: "access denied", 404: "not found", 410: "gone"}.get(status, "refused")
            return InputError(f"{location}: {reason} (HTTP {status})")
    names = {type(c).__name__ for c in chain}
    timeouts = {"ServerTimeoutError", "ReadTimeoutError", "ConnectTimeoutError"}
    if any(isinstance(c, TimeoutError) for c in chain) or names & timeouts:
        return TransientError(f"{location}: timed out; may pass, retry later")
    if names & {"gaierror", "ClientConnectorDNSError"}:
        return InputError(f"{location}: unreachable (unknown host)")
    if reading and any(isinstance(c, (ConnectionError, OSError)) for c in chain):
        return TransientError(f"{location}: connection lost while reading ({type(chain[-1]).__name__}); may pass")
    if any(isinstance(c, ConnectionRefusedError) for c in chain) or "ClientConnectorError" in names:
        return InputError(f"{location}: unreachable (connection refused)")
    if names & {"ServerDisconnectedError", "ClientPayloadError", "ClientOSError"} or any(
            isinstance(c, ConnectionResetError) for c in chain):
        return TransientError(f"{location}: connection lost ({type(chain[-1]).__name__}); may pass")
    if any(isinstance(c, PermissionError) for c in chain):
        return InputError(f"{location}: access denied")
    if any(isinstance(c, FileNotFoundError) for c in chain):
        return InputError(f"{location}: not found")
    detail = str(chain[-1]).strip().splitlines()[0][:200] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return InputError(f"{location}: cannot be read ({detail})")
