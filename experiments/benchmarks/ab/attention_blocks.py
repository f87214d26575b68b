"""old: causal self-attention as one T x T block; new: blocks of `decoder.ATTENTION_BLOCK` query rows that
skip the keys the causal mask hides (`decoder.causal_attend`)."""
import sft_jax.models.decoder as decoder

_NEW = decoder.ATTENTION_BLOCK


def apply(variant: str) -> None:
    decoder.ATTENTION_BLOCK = {"old": 1 << 30, "new": _NEW}[variant]
