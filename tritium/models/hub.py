"""Where a checkpoint's files come from: a local folder, or a Hugging Face Hub repository
through huggingface_hub (its local cache first; nothing is downloaded but the files asked
for). `HF_HUB_OFFLINE=1` is honoured when it is set, even after huggingface_hub was
imported."""

from __future__ import annotations

import os
from pathlib import Path


class CheckpointFiles:
    """The files of one checkpoint: `CheckpointFiles("google/gemma-2-2b")` or
    `CheckpointFiles("/path/to/folder")`. `get(name)` returns the local path of `name`,
    downloading it from the hub when needed, or None for an optional file that the
    checkpoint does not have."""

    def __init__(self, path_or_repo_id: str | os.PathLike, revision: str | None = None):
        self.name = str(path_or_repo_id)
        self.revision = revision
        self.folder = Path(path_or_repo_id) if Path(path_or_repo_id).is_dir() else None
        if self.folder is not None and revision is not None:
            raise ValueError(f"revision: {self.name} is a local folder; a revision applies to hub repositories only")

    def get(self, filename: str, *, required: bool = True) -> Path | None:
        if self.folder is not None:
            path = self.folder / filename
            if path.is_file():
                return path
            if required:
                raise FileNotFoundError(f"{self.name}: no {filename} in this folder")
            return None
        return self._download(filename, required)

    def _download(self, filename: str, required: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        try:
            return Path(hf_hub_download(self.name, filename, revision=self.revision, local_files_only=offline))
        except HFValidationError:
            raise FileNotFoundError(f"{self.name}: neither a local folder nor a hub repository id") from None
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"{self.name}: no such hub repository (or it is private or gated and no "
                                    "token gives access; `hf auth login`)") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"{self.name}: no revision {self.revision!r}") from None
        except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: first
            # Offline, or the hub is unreachable: only the local cache could answer.
            if required or not offline:
                where = "HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached"
                raise FileNotFoundError(f"{self.name}: {filename} is not in the local Hugging Face cache and {where}; "
                                        "download it once online, or pass a local folder") from None
            return None
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"{self.name}: the repository has no {filename}") from None
            return None
