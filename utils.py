"""The original helper users import: load_model_on_gpus. The scripts' flags and loading moved into the package
(model/flags.py); the names below stay importable from here for scripts written against the old utils.py."""

from __future__ import annotations

from model.flags import (DEFAULT_MODEL, ModelLoadError, build_parser, load_from_args, load_or_exit,  # noqa: F401
                         logins, model_id, service_from_args)


def load_model_on_gpus(checkpoint_path: str, num_gpus: int = 2, device_map: dict | None = None, **kwargs):
    """The original helper: the model with its 28 layers spread over num_gpus GPUs (word embeddings, final norm
    and output layer on GPU 0); a given device_map overrides the split; num_gpus < 2 loads on one device."""
    from model.multigpu import load_model_on_gpus as load

    return load(checkpoint_path, num_gpus=num_gpus, device_map=device_map, **kwargs)
