"""Model shapes: the one description of a LLaMa-style model that the cost model and the runtime share."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from topology.errors import ConfigError
from topology.yamlio import check_keys, read_yaml

MODELS_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    context: int
    vocab_size: int
    num_kv_heads: int | None = None  # None: as many as num_heads (no grouped-query attention)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    dtype_bytes: int = 2  # bytes per activation/gradient element on the wire (bf16)

    def __post_init__(self):
        for field in ("dim", "num_layers", "num_heads", "ffn_dim", "context", "vocab_size", "dtype_bytes"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        for field in ("norm_eps", "rope_theta"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ConfigError(f"model {self.name!r}: {field} must be a positive number, got {value!r}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"model {self.name!r}: tie_embeddings must be true or false, got {self.tie_embeddings!r}")
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not isinstance(self.num_kv_heads, int) or self.num_kv_heads <= 0:
            raise ConfigError(f"model {self.name!r}: num_kv_heads must be a positive integer")
        if self.dim % self.num_heads:
            raise ConfigError(f"model {self.name!r}: dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model {self.name!r}: num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if (self.dim // self.num_heads) % 2:
            raise ConfigError(f"model {self.name!r}: head dim {self.dim // self.num_heads} must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one transformer layer: attention, SwiGLU MLP, two RMSNorm weights."""
        kv_dim = self.num_kv_heads * self.head_dim
        attention = self.dim * self.dim * 2 + self.dim * kv_dim * 2
        return attention + 3 * self.dim * self.ffn_dim + 2 * self.dim

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.dim

    @property
    def head_params(self) -> int:
        """Final norm plus LM head (tied heads share the embedding's weights)."""
        return self.dim + (0 if self.tie_embeddings else self.vocab_size * self.dim)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_model_spec(path_or_name: str | Path) -> ModelSpec:
    """Load a model YAML, by path or by the name of a file in configs/models/."""
    path = Path(path_or_name)
    if not path.exists() and (MODELS_DIR / f"{path_or_name}.yaml").is_file():
        path = MODELS_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in MODELS_DIR.glob("*.yaml")))
        raise ConfigError(f"model file not found: {path_or_name}; pass a path or one of: {known}")
    return model_spec_from_dict(read_yaml(path), where=str(path))


def model_spec_from_dict(data: dict, where: str = "model") -> ModelSpec:
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    check_keys(data, fields, where, required={"name", "dim", "num_layers", "num_heads", "ffn_dim", "context", "vocab_size"})
    return ModelSpec(**data)


def split_layers(num_layers: int, num_stages: int) -> list[range]:
    """Consecutive layers per stage, as even as possible; earlier stages take the remainder.

    Stage 0 also holds the embedding, the final norm and the LM head (docs/design.md, "The stage model").
    """
    if num_stages > num_layers:
        raise ConfigError(f"{num_stages} stages but the model has only {num_layers} layers; use at most {num_layers} stages")
    base, extra = divmod(num_layers, num_stages)
    ranges, start = [], 0
    for stage in range(num_stages):
        size = base + (1 if stage < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges
