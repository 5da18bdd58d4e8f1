"""Kiln's artifact store. Imports nothing else of Kiln's; see store.py for the commit protocol."""

from storage.manifest import MANIFEST_NAME, FileEntry, Manifest, StorageError, canonical_json, fingerprint
from storage.store import ArtifactStore, ArtifactWriter, default_root, sha256_of

__all__ = [
    "MANIFEST_NAME", "ArtifactStore", "ArtifactWriter", "FileEntry", "Manifest", "StorageError",
    "canonical_json", "default_root", "fingerprint", "sha256_of",
]
