"""Turn a local path or a Hugging Face Hub id into a local checkpoint directory; the errors about a checkpoint's
files (here, below both config modules, so that neither imports the other for them)."""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ["*.json", "*.model"]


class ModelNotFoundError(OSError):
    """A model could be neither found locally nor downloaded."""


class CheckpointError(ValueError):
    """A checkpoint's files are missing, unreadable or disagree with each other; the message names the file."""


class UnsupportedConfigError(CheckpointError):
    """A config.json flag has a value this implementation does not compute."""


def read_json(filename: str) -> dict:
    """A checkpoint's JSON file as a dict; CheckpointError naming the file when it is not a JSON object."""
    try:
        with open(filename, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{filename} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); "
                              f"restore it from the original checkpoint") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{filename} is not UTF-8 text; restore it from the original checkpoint") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{filename} holds a JSON {type(data).__name__}, not an object; restore it from the "
                              f"original checkpoint")
    return data


def _how_to_get(name: str) -> str:
    return (
        f"To use {name} without network access, download it on a machine that has it "
        f"(`hf download {name} --local-dir ./{name.split('/')[-1]}`), copy the folder here and pass its path "
        f"(e.g. --model ./{name.split('/')[-1]}). To try the code without any weights, write a tiny random "
        f"model with `python -m model.tiny ./chatglm-tiny` and pass --model ./chatglm-tiny."
    )


def resolve_model_dir(name_or_path: str, revision: str | None = None, weights: bool = True) -> str:
    """Return a local directory holding the checkpoint (downloading from the Hub when needed).

    A Hub id is looked up online first; when the Hub cannot be reached a copy in the local Hugging Face cache
    is used; when there is none, ModelNotFoundError explains how to get the files.
    """
    name_or_path = os.fspath(name_or_path)
    if os.path.isdir(name_or_path):
        return name_or_path
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1:
        raise ModelNotFoundError(
            f"{name_or_path!r} is not a checkpoint directory nor a Hub id of the form 'owner/name'."
        )
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    patterns = list(TOKENIZER_FILES)
    online_error: Exception | None = None
    if not _offline():
        try:
            if weights:
                patterns.append(_weight_pattern(name_or_path, revision))
            return snapshot_download(name_or_path, revision=revision, allow_patterns=patterns)
        except Exception as e:  # connection refused, DNS failure, 401/404, ...
            online_error = e
            logger.warning("could not reach the Hub for %s (%s); looking in the local cache", name_or_path, e)
    try:
        return snapshot_download(name_or_path, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        reason = f"the Hub could not be reached ({online_error})" if online_error else "offline mode is on"
        raise ModelNotFoundError(
            f"Model {name_or_path!r} is not in the local cache and {reason}. {_how_to_get(name_or_path)}"
        ) from e


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _weight_pattern(repo_id: str, revision: str | None) -> str:
    """Download one weight format: safetensors when the repository has them, else .bin."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo_id, revision=revision)  # one request, no retry loop when offline
    files = [s.rfilename for s in info.siblings or []]
    return "*.safetensors" if any(f.endswith(".safetensors") for f in files) else "*.bin"
