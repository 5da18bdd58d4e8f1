"""Kiln's artifact store and stage contract. Imports nothing else of Kiln's; see store.py for
the commit protocol and stage.py for the stage protocol."""

from storage.atomic import (
    TEMP_MARK,
    atomic_dir,
    atomic_file,
    atomic_path,
    atomic_write_bytes,
    finish_dir,
    is_temporary,
    swap_into_place,
)
from storage.manifest import MANIFEST_NAME, FileEntry, Manifest, StorageError, canonical_json, fingerprint
from storage.stage import (
    PERMANENT_OS_ERRORS,
    ConfigError,
    InputError,
    KilnError,
    Stage,
    StageConfig,
    TransientError,
    os_error_line,
)
from storage.store import (
    ArtifactStore,
    ArtifactWriter,
    add_written,
    default_root,
                            local_sha256,
                            sha256_of,
    take_written,
)

__all__ = [
    "TEMP_MARK", "atomic_dir", "atomic_file", "atomic_path", "atomic_write_bytes", "finish_dir", "is_temporary",
    "swap_into_place",
    "MANIFEST_NAME", "ArtifactStore", "ArtifactWriter", "FileEntry", "Manifest", "StorageError",
    "canonical_json", "default_root", "fingerprint", "local_sha256", "sha256_of", "add_written", "take_written",
    "ConfigError", "InputError", "KilnError", "Stage", "StageConfig", "TransientError", "PERMANENT_OS_ERRORS",
    "os_error_line",
]
