"""What a checkpoint holds, recorded in it: the full model spec and the tokenizer's identity.

Note [self-describing checkpoints]: a config names its model by a name or a YAML path, and a tokenizer by a
path, both of which can be edited after the run. meta.json therefore records the model spec itself
(ModelSpec.to_dict) and the tokenizer's name, vocabulary size and the sha256 of its tokenizer.json.
That tokenizer record (`tokenizer_identity`) is the one a prepared data folder's meta.json holds too
(skippipe/shards.py): one identity for a tokenizer, wherever the project records which one it used.
Every reader (evaluate, export, --resume) builds the model from the recorded spec; a resumed run whose
command names a model with another spec, or whose tokenizer file changed, is refused.

Checkpoints written before this was recorded have no `model` in meta.json. Readers then fall back to the
run's config.yaml model, as it reads now, and say so in one warning line (README, "Bad input").
"""
from __future__ import annotations

from pathlib import Path

from skippipe.tokenizer import file_sha256
from topology.errors import ConfigError
from topology.model_spec import ModelSpec, load_model_spec, model_spec_from_dict


def tokenizer_identity(tokenizer) -> dict:
    """{'name', 'vocab_size', 'sha256'} of a loaded tokenizer (sha256 of its tokenizer.json; None for the
    byte tokenizer, which has no file). The one tokenizer record of checkpoints and prepared data."""
    path = getattr(tokenizer, "path", None)
    digest = file_sha256(path) if path is not None else None
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "sha256": digest}


def checkpoint_identity(spec: ModelSpec, tokenizer) -> dict:
    """The entries save_checkpoint adds to meta.json."""
    return {"model": spec.to_dict(), "tokenizer": tokenizer_identity(tokenizer)}


def recorded_spec(meta: dict, folder: Path, model_setting: str) -> tuple[ModelSpec, str | None]:
    """(the model spec a checkpoint holds, None); for an old checkpoint, (`model_setting` as it reads now,
    the warning to print once the checkpoint has loaded: an error on the way stays the only line).

    Raises ConfigError when the recorded spec is malformed.
    """
    if "model" not in meta:
        return load_model_spec(model_setting), (
            f"warning: {folder / 'meta.json'} records no model spec (a checkpoint from before specs were "
            f"recorded); built the model from its config's model {model_setting!r} as that reads now")
    if not isinstance(meta["model"], dict):
        raise ConfigError(f"{folder / 'meta.json'}: model must be a mapping, got {meta['model']!r}; the checkpoint "
                          f"is damaged")
    return model_spec_from_dict(meta["model"], where=f"{folder / 'meta.json'} model"), None


def check_model(recorded: ModelSpec, now: ModelSpec, *, folder: Path, model_setting: str) -> None:
    """A resumed run's model must be the checkpoint's; raises ConfigError naming the first differing field."""
    old, new = recorded.to_dict(), now.to_dict()
    for key in old:
        if old[key] != new.get(key) and key != "name":
            raise ConfigError(f"model {model_setting!r} has {key} {new.get(key)!r} but the checkpoint {folder} holds "
                              f"a model with {key} {old[key]!r}; restore the model file, or start a new run in "
                              f"another --run-dir")


def check_tokenizer(meta: dict, tokenizer, folder: Path) -> None:
    """The tokenizer a reader loads must be the one the checkpoint was trained with (when recorded)."""
    recorded = meta.get("tokenizer")
    if not isinstance(recorded, dict):
        return
    now = tokenizer_identity(tokenizer)
    for key in ("name", "vocab_size", "sha256"):
        if recorded.get(key) != now[key]:
            raise ConfigError(f"tokenizer {now['name']!r} has {key} {now[key]!r} but the checkpoint {folder} was "
                              f"trained with {key} {recorded.get(key)!r}; restore that tokenizer file, or start a "
                              f"new run in another --run-dir")
