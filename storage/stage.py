"""The stage contract: a pydantic config, a build function, and the artifact it makes.

A stage is a config (`StageConfig`, also the Prefect UI's form) plus a build function
`(config, inputs, store, writer) -> stats`. `Stage.run` fingerprints (stage name, config,
input fingerprints, code version) and asks the store for that artifact, building it only when
it is missing or damaged. The errors say what a user can act on; the orchestrator retries
only `TransientError`.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from storage.manifest import Manifest, fingerprint
from storage.store import ArtifactStore, ArtifactWriter


class KilnError(Exception):
    """An error a user can act on; its message is one line naming the file and the reason."""

    retriable: ClassVar[bool] = False


class ConfigError(KilnError):
    """A setting is invalid. Retrying cannot help."""


class InputError(KilnError):
    """An input is missing, unreachable or not what it claims to be. Retrying cannot help."""


class TransientError(KilnError):
    """A failure that may pass (a network blip); the orchestrator retries these with backoff."""

    retriable = True


# OSErrors that retrying cannot mend: permissions, a read-only or full disk, a path that is not
# what it should be. They end a run at once, as one line naming the path.
PERMANENT_OS_ERRORS = frozenset({
    errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
    errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG,
})


def os_error_line(err: OSError) -> str:
    """`<path>: <reason>`, the one line an OSError becomes for a user."""
    where = err.filename if err.filename is not None else "kiln"
    return f"{where}: {(err.strerror or str(err)).lower()}"


class StageConfig(BaseModel):
    """Base of every stage config. Fields in `runtime_fields` change how fast a stage runs,
    not what it produces, so they are left out of the fingerprint."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    runtime_fields: ClassVar[frozenset[str]] = frozenset({"workers"})

    def fingerprint_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude=set(self.runtime_fields))


BuildFn = Callable[[Any, list[Manifest], ArtifactStore, ArtifactWriter], dict[str, Any] | None]


@dataclass(frozen=True)
class Stage:
    """One data stage: `name/<fingerprint>/` in the store is its output.

    `describe_sources(config)`, for stages that read from outside the store (ingest), returns
    what identifies those files now (paths with sizes and mtimes, ETags): it joins the
    fingerprint, so a changed crawl file or a glob that matches more files is a new artifact.
    """

    name: str
    config_cls: type[StageConfig]
    build: BuildFn
    code_version: str = "1"
    describe_sources: Callable[[Any], Any] | None = None

    def fingerprint(self, config: StageConfig, inputs: list[Manifest]) -> str:
        identity = config.fingerprint_dict()
        if self.describe_sources is not None:
            identity = {**identity, "external_sources": self.describe_sources(config)}
        return fingerprint(self.name, identity, [m.fingerprint for m in inputs], self.code_version)

    def run(self, config: StageConfig, inputs: list[Manifest], store: ArtifactStore, *,
            force: bool = False) -> Manifest:
        fp = self.fingerprint(config, inputs)
        started = time.perf_counter()

        def build(writer: ArtifactWriter) -> dict[str, Any]:
            stats = self.build(config, inputs, store, writer) or {}
            stats.setdefault("seconds", round(time.perf_counter() - started, 3))
            return stats

        return store.produce(
            self.name, fp, build,
            config=config.fingerprint_dict(), inputs=[m.fingerprint for m in inputs],
            code_version=self.code_version, force=force,
        )
