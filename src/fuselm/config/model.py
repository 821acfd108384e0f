"""ModelConfig: every architectural switch of the one Transformer, as data.

Field names follow the checkpoint's own config.json keys where one exists (hidden_size, num_attention_heads, ...).
Architecture-specific parsing lives in the records of fuselm.archs; this file names no architecture.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import FuselmError

NORM_KINDS = ("rms", "layer")
MLP_KINDS = ("swiglu", "gelu")
BLOCK_KINDS = ("pre_norm", "swin_norm", "parallel")


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # the name of the fuselm.archs record whose name tables and layouts apply
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm_kind: str = "rms"
    norm_eps: float = 1e-5
    norm_bias: bool = False  # LayerNorm beta present (Falcon)
    mlp_kind: str = "swiglu"
    # pre_norm: x + attn(n1(x)), then + mlp(n2(h)); swin_norm: x + n1(attn(x)), then + n2(mlp(h));
    # parallel: x + attn(n1(x)) + mlp(n2(x)) where n2 is n1 when parallel_norms == 1 (Falcon-7B).
    block_kind: str = "pre_norm"
    parallel_norms: int = 1
    qk_norm: bool = False  # LayerNorm over head_dim on q and k, before RoPE (Chameleon)
    qk_norm_eps: float = 1e-5
    qkv_bias: bool = False  # biases on q, k and v (Qwen2, Falcon with bias, FlashNorm-folded models)
    o_bias: bool = False  # bias on the attention output projection
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    sliding_window: int | None = None  # each query sees at most this many keys, itself included (Mistral)
    flashnorm: bool = False  # norm weights folded into the following linears (weights may be absent)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    extra: dict = field(default_factory=dict, compare=False)  # arch-specific leftovers kept for writers

    def __post_init__(self) -> None:
        checks = [
            (self.norm_kind in NORM_KINDS, f"norm_kind must be one of {NORM_KINDS}, got {self.norm_kind!r}"),
            (self.mlp_kind in MLP_KINDS, f"mlp_kind must be one of {MLP_KINDS}, got {self.mlp_kind!r}"),
            (self.block_kind in BLOCK_KINDS, f"block_kind must be one of {BLOCK_KINDS}, got {self.block_kind!r}"),
            (self.parallel_norms in (1, 2), f"parallel_norms must be 1 or 2, got {self.parallel_norms}"),
        ]
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            checks.append((isinstance(value, int) and value > 0, f"{key} must be a positive integer, got {value!r}"))
        checks.append((self.sliding_window is None or (isinstance(self.sliding_window, int)
                                                        and self.sliding_window > 0),
                       f"sliding_window must be a positive integer or None, got {self.sliding_window!r}"))
        for ok, message in checks:
            if not ok:
                raise FuselmError(f"invalid model config: {message}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FuselmError(
                f"invalid model config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def replace(self, **changes) -> ModelConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)
