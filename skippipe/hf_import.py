"""Pretrained weights in: a local Hugging Face LlamaForCausalLM folder as a skippipe model and checkpoint.

    spec = spec_from_hf_config(read_hf_config(HF_DIR))     # ConfigError naming any unsupported field
    import_hf(HF_DIR, RUN_DIR, num_stages=4)               # RUN_DIR/model.yaml + a step-0 checkpoint
    scripts/train.py ... model=RUN_DIR/model.yaml train.init_from=RUN_DIR   # fine-tune it with skipping

Weight names map 1:1 (skippipe/model.py: a stage's keys are Hugging Face's without ``model.``, layers by
global index), so a stage takes its tensors from the safetensors files by name, whatever the cut.
What skippipe's decoder does not compute (rope scaling, attention or MLP biases, sliding-window attention,
another activation or head size, other architectures) is refused, naming the config.json field: a
silently different model would fine-tune from the wrong function.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from skippipe.model import FullModel
from topology.errors import ConfigError
from topology.model_spec import ModelSpec


def read_hf_config(folder: str | Path) -> dict:
    """config.json of a Hugging Face model folder, as a dict; a missing or malformed file is a ConfigError."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{path} not found; --model must be a local Hugging Face model folder "
                          "(config.json and *.safetensors)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: malformed JSON ({exc}); fix or re-download the file") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return config


def _rope_theta(config: dict, where: str) -> float:
    """rope_theta (transformers 4) or rope_parameters (transformers 5); any scaling is refused."""
    params = config.get("rope_parameters") or {}
    if config.get("rope_scaling"):
        raise ConfigError(f"{where}: rope_scaling {config['rope_scaling']!r} is not supported (skippipe computes "
                          "plain rotary embeddings); use a model without rope_scaling")
    if params.get("rope_type", "default") != "default":
        raise ConfigError(f"{where}: rope_parameters.rope_type {params['rope_type']!r} is not supported; only "
                          "'default' rotary embeddings are")
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def spec_from_hf_config(config: dict, name: str = "imported", where: str = "config.json") -> ModelSpec:
    """The ModelSpec of a LlamaForCausalLM config.json; ConfigError naming the first unsupported field."""
    architectures = config.get("architectures") or []
    if config.get("model_type") != "llama" or architectures != ["LlamaForCausalLM"]:
        raise ConfigError(f"{where}: architectures {architectures} / model_type {config.get('model_type')!r}; "
                          "skippipe imports LlamaForCausalLM (model_type 'llama') only")
    for field in ("attention_bias", "mlp_bias"):
        if config.get(field):
            raise ConfigError(f"{where}: {field} is true; skippipe's layers have no biases")
    for field in ("sliding_window", "use_sliding_window"):
        if config.get(field):
            raise ConfigError(f"{where}: {field} {config[field]!r} is not supported; skippipe attends to the whole context")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{where}: hidden_act {config['hidden_act']!r} is not supported; skippipe's MLP is SwiGLU (silu)")
    try:
        dim, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        head_dim = config.get("head_dim")
        if head_dim is not None and int(head_dim) != dim // heads:
            raise ConfigError(f"{where}: head_dim {head_dim} differs from hidden_size / num_attention_heads = "
                              f"{dim // heads}; skippipe derives the head size from them")
        return ModelSpec(name=name, dim=dim, num_layers=int(config["num_hidden_layers"]), num_heads=heads,
                         num_kv_heads=int(config.get("num_key_value_heads") or heads),
                         ffn_dim=int(config["intermediate_size"]), context=int(config["max_position_embeddings"]),
                         vocab_size=int(config["vocab_size"]), norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                         rope_theta=_rope_theta(config, where),
                         tie_embeddings=bool(config.get("tie_word_embeddings", False)))
    except KeyError as exc:
        raise ConfigError(f"{where}: {exc.args[0]} is missing; is this a LlamaForCausalLM config.json?") from None
    except (TypeError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"{where}: a size field is not a number ({exc})") from None


def _safetensors_index(folders_files: list[Path]) -> dict[str, Path]:
    """{tensor name: file} over the given safetensors files (headers only)."""
    index = {}
    for file in folders_files:
        try:
            with safe_open(str(file), framework="pt") as f:
                index.update({key: file for key in f.keys()})
        except Exception as exc:  # safetensors raises its own error type for every kind of bad file
            raise ConfigError(f"{file}: not a readable safetensors file ({' '.join(str(exc).split())[:160]})") from None
    return index


def _read(index: dict[str, Path], keys: list[str], where: Path) -> dict[str, torch.Tensor]:
    missing = [k for k in keys if k not in index]
    if missing:
        raise ConfigError(f"{where}: no tensor {missing[0]!r} ({len(missing)} missing); the weights do not "
                          "match the model's config")
    out = {}
    for file in sorted({index[k] for k in keys}):
        with safe_open(str(file), framework="pt") as f:
            for key in keys:
                if index[key] == file:
                    out[key] = f.get_tensor(key).float()
    return out


def hf_stage_source(folder: Path) -> tuple[dict[str, Path], callable]:
    """(index, key mapping) of a Hugging Face folder: a stage key k is stored under model.k (lm_head.* as is)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{folder}: no *.safetensors files; skippipe reads safetensors weights only "
                          "(convert .bin weights with transformers' save_pretrained(safe_serialization=True))")
    return _safetensors_index(files), (lambda key: key if key.startswith("lm_head.") else f"model.{key}")


def load_stage_weights(source: str | Path, stages: dict[int, torch.nn.Module], spec: ModelSpec) -> None:
    """Set every held stage's weights from ``source``: a run dir or checkpoint folder (any cut), or a
    Hugging Face LlamaForCausalLM folder. Its model must have ``spec``'s shapes (the name may differ)."""
    source = Path(source)
    if (source / "config.json").is_file() and not (source / "checkpoints").is_dir():
        theirs = spec_from_hf_config(read_hf_config(source), spec.name, str(source / "config.json"))
        index, name_of = hf_stage_source(source)
    else:
        from skippipe.checkpoint import checkpoint_folder, checkpoint_meta
        from skippipe.config import load_config
        from skippipe.identity import recorded_spec
        folder = checkpoint_folder(source)
        # The spec the checkpoint records (Note [self-describing checkpoints] in identity.py); an old
        # checkpoint without one: its config's model, as the other readers do.
        theirs, _ = recorded_spec(checkpoint_meta(folder), folder, load_config(folder / "config.yaml").model)
        index, name_of = _safetensors_index(sorted(folder.glob("stage*.safetensors"))), (lambda key: key)
    if {**theirs.to_dict(), "name": spec.name} != spec.to_dict():
        raise ConfigError(f"train.init_from {source} holds model {theirs.name!r} of other shapes than {spec.name!r}; "
                          f"train its model (e.g. model={source}/model.yaml)")
    for module in stages.values():
        keys = [k for k in module.state_dict() if not (k == "lm_head.weight" and spec.tie_embeddings)]
        weights = _read(index, [name_of(k) for k in keys], source)
        state = {k: weights[name_of(k)] for k in keys}
        if spec.tie_embeddings and "embed_tokens.weight" in state:
            state["lm_head.weight"] = state["embed_tokens.weight"]
        module.load_state_dict(state)


def import_hf(model_dir: str | Path, run_dir: str | Path, *, num_stages: int | None = None,
              config: str | Path | None = None, name: str | None = None) -> Path:
    """Write RUN_DIR/model.yaml, RUN_DIR/config.yaml and a step-0 checkpoint cut into ``num_stages`` stages
    (or the schedule.num_stages of the training ``config``, which the written config.yaml is based on).

    The checkpoint holds weights only (no optimizer or data state): evaluate and export read it, and a
    run starts from it with ``train.init_from=RUN_DIR``. The folder's tokenizer.json, when present, is
    copied and becomes data.tokenizer. Raises ConfigError for an unsupported model or an existing RUN_DIR.
    """
    from skippipe.config import load_config, save_config
    model_dir, run_dir = Path(model_dir), Path(run_dir)
    if (num_stages is None) == (config is None):
        raise ConfigError("pass exactly one of --stages and --config")
    if config is not None:
        num_stages = load_config(config).schedule.num_stages
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise ConfigError(f"--out {run_dir} exists and is not an empty folder; pass a new run dir")
    name = name or model_dir.resolve().name
    spec = spec_from_hf_config(read_hf_config(model_dir), name, str(model_dir / "config.json"))
    model = FullModel(spec, num_stages, seed=0)  # weights are replaced below; the seed is irrelevant
    load_stage_weights(model_dir, dict(enumerate(model.stages)), spec)
    tmp = run_dir.with_name(f".{run_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    folder = tmp / "checkpoints" / "step_000000"
    folder.mkdir(parents=True)
    try:
        (tmp / "model.yaml").write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
        overrides = [f"model={run_dir / 'model.yaml'}", f"schedule.num_stages={num_stages}", f"train.run_dir={run_dir}"]
        if (model_dir / "tokenizer.json").is_file():
            shutil.copyfile(model_dir / "tokenizer.json", tmp / "tokenizer.json")
            overrides.append(f"data.tokenizer={run_dir / 'tokenizer.json'}")
        cfg = load_config(config, overrides)
        for index, stage in enumerate(model.stages):
            weights = {k: v.detach().clone().contiguous() for k, v in stage.state_dict().items()}
            save_file(weights, str(folder / f"stage{index}.safetensors"), metadata={"stage": str(index), "step": "0"})
        save_config(cfg, tmp / "config.yaml")
        save_config(cfg, folder / "config.yaml")
        from skippipe.data import load_tokenizer
        from skippipe.identity import checkpoint_identity
        tokenizer = tmp / "tokenizer.json" if (tmp / "tokenizer.json").is_file() else "byte"
        identity = checkpoint_identity(spec, load_tokenizer(str(tokenizer)))
        identity["tokenizer"]["name"] = cfg.data.tokenizer  # where it lies once the folder is renamed into place
        (folder / "meta.json").write_text(json.dumps({"step": 0, "num_stages": num_stages, "num_nodes": None,
                                                      **identity, "imported_from": str(model_dir)}))
        (tmp / "checkpoints" / "latest").write_text("step_000000\n")
        if run_dir.is_dir():
            run_dir.rmdir()
        tmp.replace(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return run_dir
