"""The CLIP BPE tokenizer that every Stable Diffusion family uses, built offline from shipped data.

A single-file checkpoint (A1111 layout) holds the networks but no tokenizer. SD1's CLIP ViT-L,
SD2's OpenCLIP ViT-H and both SDXL text encoders share one byte-level BPE vocabulary of 49408
tokens: the 256 byte symbols, the same with the end-of-word mark ``</w>``, 48894 merges, then
``<|startoftext|>`` and ``<|endoftext|>``. Only the merge list is data (shipped as
``component_configs/clip_bpe_merges.txt.gz``, from OpenAI's CLIP release, MIT licence); the
vocabulary follows from it by that rule, so nothing is downloaded.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

MERGES_FILE = Path(__file__).with_name("component_configs") / "clip_bpe_merges.txt.gz"
MERGE_COUNT = 49408 - 2 * 256 - 2  # vocabulary size minus byte symbols (plain and </w>) and the two markers
MAX_LENGTH = 77  # the text encoders' position embeddings


def byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the bytes 0..255, in vocabulary order.

    Bytes that are printable Latin-1 characters stand for themselves and come first; the rest
    (control characters, space, a few others) are mapped, in byte order, to code points from 256 up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(256 - len(printable))]


@lru_cache(maxsize=1)
def _vocabulary_and_merges() -> tuple[dict[str, int], tuple[str, ...]]:
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as handle:
        merges = tuple(line.rstrip("\n") for line in handle if line.strip())
    if len(merges) != MERGE_COUNT:
        raise RuntimeError(f"{MERGES_FILE} holds {len(merges)} merges, expected {MERGE_COUNT}; the file is damaged.")
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols] + [merge.replace(" ", "") for merge in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}, merges


def standard_clip_tokenizer(pad_token: str = "<|endoftext|>"):
    """A transformers CLIPTokenizer equal to the published SD tokenizers (77 tokens), padding
    with ``pad_token`` ("<|endoftext|>" for CLIP ViT-L, "!" for the OpenCLIP encoders)."""
    from transformers import CLIPTokenizer

    vocabulary, merges = _vocabulary_and_merges()
    pairs = [tuple(merge.split(" ")) for merge in merges]
    return CLIPTokenizer(vocab=dict(vocabulary), merges=pairs, pad_token=pad_token, model_max_length=MAX_LENGTH)
