"""Export a checkpoint as a Hugging Face LlamaForCausalLM folder that transformers loads offline.

    OUT/config.json              LlamaConfig (written as JSON: exporting does not need transformers)
    OUT/model.safetensors        every stage's weights under Hugging Face names (model.hf_state_dict)
    OUT/tokenizer.json           the run's tokenizer (see Note [byte tokenizer])
    OUT/tokenizer_config.json    PreTrainedTokenizerFast, so AutoTokenizer finds it, with BOS/EOS/pad declared
    OUT/special_tokens_map.json  the same BOS/EOS/pad, for tools that read this file
    OUT/generation_config.json   bos/eos/pad ids, so generation stops at EOS and batches pad
    OUT/skippipe.json            where it came from: checkpoint, step, kept stages and layers

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(OUT); tokenizer = AutoTokenizer.from_pretrained(OUT)

With `stages` (e.g. from omission.kept_stages) only those stages' layers are exported, renumbered in
natural order: a smaller model that computes exactly what the evaluator measured with those stages kept.

Note [byte tokenizer]: skippipe's default tokenizer has no files: token id = UTF-8 byte. The export
writes it as a `tokenizers` BPE model whose 256 entries are the byte tokens <0x00>..<0xFF> (id = byte),
with no merges and byte fallback on, so every character falls back to its UTF-8 bytes and decoding fuses
them back. This is the byte-fallback scheme of the LLaMa/SentencePiece tokenizers, so transformers and
anything else that reads tokenizer.json encode exactly like skippipe.data.ByteTokenizer.

Note [declared special tokens]: evaluation harnesses need a BOS or EOS token to start a rolling
log-likelihood and to stop generation, and batched pipelines need a pad token; each must be an id of
the model's vocabulary. A BPE tokenizer from scripts/train_tokenizer.py has <|bos|>, <|eos|>, <|pad|>
(skippipe/tokenizer.py). All 256 ids of the byte tokenizer are bytes, so the export declares the ASCII
control bytes made for the purpose: STX <0x02> (start of text) as BOS, ETX <0x03> (end of text) as EOS,
NUL <0x00> as pad. The skippipe corpora never contain them, so no text the model saw means otherwise.
Encoding adds none of them, as in training, so an exported tokenizer encodes exactly as skippipe did.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from skippipe.checkpoint import atomic_write
from skippipe.model import FullModel, hf_state_dict
from topology.errors import ConfigError
from topology.model_spec import ModelSpec


BYTE_SPECIALS = {"bos": ("<0x02>", 2), "eos": ("<0x03>", 3), "pad": ("<0x00>", 0)}  # Note [declared special tokens]


def hf_config(spec: ModelSpec, num_layers: int | None = None, context: int | None = None,
              special: dict[str, tuple[str, int]] | None = None) -> dict:
    """config.json for LlamaForCausalLM. Both rope spellings: rope_parameters (transformers 5) and
    rope_theta (4.x), so the folder loads with either. ``special``: {'bos'|'eos'|'pad': (token, id)}."""
    special = special or {}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.dim,
        "intermediate_size": spec.ffn_dim,
        "num_hidden_layers": num_layers if num_layers is not None else spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": context or spec.context,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": spec.tie_embeddings,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special.get("bos", (None, None))[1],
        "eos_token_id": special.get("eos", (None, None))[1],
        "pad_token_id": special.get("pad", (None, None))[1],
        "torch_dtype": "float32",
    }


def byte_tokenizer():
    """A `tokenizers` Tokenizer whose ids are UTF-8 bytes (Note [byte tokenizer])."""
    try:
        from tokenizers import Tokenizer, decoders, models
    except ImportError:
        raise ConfigError("exporting a tokenizer needs the 'tokenizers' package; pip install tokenizers "
                          "(or pip install -e '.[hf]')") from None
    vocab = {f"<0x{byte:02X}>": byte for byte in range(256)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tokenizer.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def export_tokenizer(tokenizer_name: str, out_dir: Path, context: int, vocab_size: int) -> dict[str, tuple[str, int]]:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; returns the declared
    {'bos'|'eos'|'pad': (token, id)} (Note [declared special tokens]). Raises ConfigError when a
    special token's id is outside the model's vocabulary."""
    if tokenizer_name == "byte":
        tokenizer, special = byte_tokenizer(), dict(BYTE_SPECIALS)
    else:
        from skippipe.data import HFTokenizer
        from skippipe.tokenizer import special_token_ids
        tokenizer = HFTokenizer(tokenizer_name)._tokenizer
        special = special_token_ids(tokenizer)
    outside = {role: tid for role, (_, tid) in special.items() if not 0 <= tid < vocab_size}
    if outside:
        raise ConfigError(f"special token ids {outside} are outside the model's vocabulary of {vocab_size}")
    tokenizer.save(str(out_dir / "tokenizer.json"))
    names = {f"{role}_token": token for role, (token, _) in special.items()}
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": context,
        "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False,
        **names}, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    return special


def kept_state_dict(model: FullModel, stages: Sequence[int]) -> tuple[dict, list[int]]:
    """Hugging Face weights of the kept stages only, layers renumbered 0.. in natural stage order."""
    layers = [i for s in sorted(stages) for i in model.stages[s].layer_indices]
    renumber = {f"model.layers.{old}.": f"model.layers.{new}." for new, old in enumerate(layers)}
    out = {}
    for key, tensor in hf_state_dict(model).items():
        if key.startswith("model.layers."):
            prefix = ".".join(key.split(".")[:3]) + "."
            if prefix not in renumber:
                continue
            key = renumber[prefix] + key[len(prefix):]
        out[key] = tensor
    return out, layers


# Every file export_hf writes into the folder (export_tokenizer's three among them).
EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "skippipe.json")


def export_hf(model: FullModel, out_dir: str | Path, *, tokenizer: str = "byte", context: int | None = None,
              stages: Sequence[int] | None = None, provenance: dict | None = None) -> Path:
    """Write the Hugging Face folder (EXPORT_FILES); `stages` (with 0) exports only those stages' layers."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file; pass a directory")
    stages = sorted(range(model.num_stages) if stages is None else set(stages))
    if 0 not in stages:
        raise ConfigError(f"kept stages {stages} must include stage 0 (embedding and LM head)")
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = model.spec
    # The tokenizer first: a tokenizer without BOS/EOS fails before any weights are written.
    special = export_tokenizer(tokenizer, out_dir, context or spec.context, spec.vocab_size)
    weights, layers = kept_state_dict(model, stages)
    # Own contiguous storage per tensor: safetensors refuses shared or strided views.
    weights = {k: v.detach().cpu().contiguous().clone() for k, v in weights.items()}
    atomic_write(out_dir / "model.safetensors", lambda tmp: save_file(weights, str(tmp), metadata={"format": "pt"}))
    (out_dir / "config.json").write_text(json.dumps(hf_config(spec, len(layers), context, special), indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps({
        "bos_token_id": special["bos"][1], "eos_token_id": special["eos"][1], "pad_token_id": special["pad"][1]},
        indent=2) + "\n")
    (out_dir / "skippipe.json").write_text(json.dumps({
        **(provenance or {}), "model": spec.to_dict(), "num_stages": model.num_stages,
        "kept_stages": stages, "kept_layers": layers, "tokenizer": tokenizer}, indent=2) + "\n")
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path, stages: Sequence[int] | None = None, *,
                      overwrite: bool = False) -> Path:
    """A run dir (or checkpoints/step_* folder) -> the Hugging Face folder.

    `out_dir` must be new or empty unless `overwrite` (rundir.claim_output_dir); checked after the
    checkpoint loads, so a bad checkpoint is reported first. Raises ConfigError (one line).
    """
    from skippipe.checkpoint import load_full_model
    from skippipe.evaluation.omission import checkpoint_summary
    from skippipe.rundir import claim_output_dir
    model, cfg, folder = load_full_model(checkpoint)
    claim_output_dir(out_dir, overwrite=overwrite)
    return export_hf(model, out_dir, tokenizer=cfg.data.tokenizer, context=cfg.data.context or model.spec.context,
                     stages=stages, provenance=checkpoint_summary(folder))
