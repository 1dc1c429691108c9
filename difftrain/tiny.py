"""Tiny random Stable Diffusion stand-ins, made offline in about a second on a CPU.

``python -m difftrain.tiny FAMILY OUT`` writes

* ``OUT/``: a diffusers pipeline folder (StableDiffusionPipeline or
  StableDiffusionXLPipeline loads it with ``from_pretrained``), and
* ``OUT.safetensors``: the same weights as one file in the original A1111/CompVis/SGM key
  layout, with every component config and the tokenizer files in its metadata, so that
  ``difftrain.models.sd.load_sd`` loads it with no network.

The models keep each family's structure in miniature (block types, linear vs convolutional
attention projections, per-block head counts, SDXL's two text encoders and text_time
embedding, the scheduler's prediction type) so that code paths that branch on the family
are exercised by tests; their outputs are noise.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from difftrain.errors import ConfigError, exit_on_user_error
from difftrain.log import say



@dataclass(frozen=True)
class TinyFamily:
    family: str  # 'sd1' | 'sd2' | 'sdxl'
    prediction_type: str  # 'epsilon' | 'v_prediction'


TINY_FAMILIES = {
    "sd15": TinyFamily("sd1", "epsilon"),
    "sd2": TinyFamily("sd2", "epsilon"),
    "sd2-v": TinyFamily("sd2", "v_prediction"),
    "sdxl": TinyFamily("sdxl", "epsilon"),
}

# Tiny sizes shared by all families. Channel counts are multiples of 32 because the
# GroupNorm layers use 32 groups, as in the real models.
_HIDDEN = 32
_MAX_TOKENS = 77  # the pipelines pad prompts to the tokenizer's 77; keep the real length
_TINY_WORDS = ("the", "and", "cat", "dog", "photo", "of", "a")


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    shift = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + shift)
            shift += 1
    return [chr(code) for code in codes]


def build_tiny_tokenizer(pad_token: str):
    """A CLIPTokenizer over the byte alphabet plus a handful of merges (a few hundred tokens).

    Real CLIP vocabularies are 49408 tokens; this one covers every byte, so any prompt
    tokenizes, and its merges make common words single tokens so BPE is exercised.
    """
    from transformers import CLIPTokenizer

    alphabet = _byte_alphabet()
    tokens = alphabet + [char + "</w>" for char in alphabet]
    merges: list[str] = []
    for word in _TINY_WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merged = pieces[0] + pieces[1]
            if f"{pieces[0]} {pieces[1]}" not in merges:
                merges.append(f"{pieces[0]} {pieces[1]}")
                if merged not in tokens:
                    tokens.append(merged)
            pieces = [merged] + pieces[2:]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    merge_pairs = [tuple(merge.split(" ")) for merge in merges]
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merge_pairs, pad_token=pad_token)
    tokenizer.model_max_length = _MAX_TOKENS
    return tokenizer


def _text_encoder_config(tokenizer, hidden_act: str, projection_dim: int = _HIDDEN):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=2 * _HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=_MAX_TOKENS,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _unet_config(family: str) -> dict[str, Any]:
    common = dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        norm_num_groups=32,
    )
    if family == "sd1":
        # SD1: convolutional proj_in/out, attention_head_dim is (legacy) a head count.
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_HIDDEN,
            attention_head_dim=4,
        )
    if family == "sd2":
        return dict(
            common,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=_HIDDEN,
            attention_head_dim=(2, 4),
            use_linear_projection=True,
        )
    # SDXL: attention only in the deeper block, several transformer layers there, and
    # micro-conditioning (sizes, crops) embedded with the pooled text embedding.
    time_embed_dim = 8
    return dict(
        common,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=2 * _HIDDEN,  # both text encoders' hidden states, concatenated
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + _HIDDEN,
    )


def _vae_config(family: str) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )


def _scheduler(prediction_type: str):
    from diffusers import EulerDiscreteScheduler

    # The schedule every SD family was trained with.
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        timestep_spacing="leading",
        steps_offset=1,
    )


def build_tiny_pipeline(name: str, *, seed: int = 0):
    """The diffusers pipeline object of a tiny stand-in (not written anywhere).

    Args:
        name: 'sd15', 'sd2' (512, epsilon), 'sd2-v' (768-style, v-prediction) or 'sdxl'.
        seed: weights are a deterministic function of the seed.
    """
    from diffusers import (
        AutoencoderKL,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if name not in TINY_FAMILIES:
        raise ConfigError(f"unknown tiny family {name!r}; choose one of {', '.join(TINY_FAMILIES)}")
    spec = TINY_FAMILIES[name]
    # fork_rng: building a stand-in must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**_unet_config(spec.family))
        vae = AutoencoderKL(**_vae_config(spec.family))
        scheduler = _scheduler(spec.prediction_type)
        if spec.family == "sdxl":
            tokenizer = build_tiny_tokenizer(pad_token="<|endoftext|>")
            tokenizer_2 = build_tiny_tokenizer(pad_token="!")
            text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, "quick_gelu"))
            text_encoder_2 = CLIPTextModelWithProjection(_text_encoder_config(tokenizer_2, "gelu"))
            pipeline = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=unet,
                scheduler=scheduler,
            )
        else:
            # SD1 pads with <|endoftext|> and uses CLIP-L's quick_gelu; SD2's OpenCLIP
            # tokenizer pads with "!" and its text tower uses exact gelu.
            pad_token, hidden_act = ("<|endoftext|>", "quick_gelu") if spec.family == "sd1" else ("!", "gelu")
            tokenizer = build_tiny_tokenizer(pad_token=pad_token)
            text_encoder = CLIPTextModel(_text_encoder_config(tokenizer, hidden_act))
            pipeline = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module):
            module.eval()
    return pipeline


def make_tiny(family: str, out: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny stand-in as a diffusers folder ``out`` and a single file ``out.safetensors``.

    Args:
        family: 'sd15', 'sd2' (512, epsilon), 'sd2-v' (v-prediction) or 'sdxl'.
        out: the folder to write; ``<out>.safetensors`` is written beside it.
        seed: the weights are a deterministic function of (family, seed).

    Returns:
        The folder path. The single file is ``out.with_name(out.name + '.safetensors')``.
    """
    from difftrain.models.sd import SDModel

    out = Path(out)
    pipeline = build_tiny_pipeline(family, seed=seed)
    pipeline.save_pretrained(out, safe_serialization=True)
    model = SDModel.from_pipeline(pipeline, source=out)
    from difftrain.models.sd import export_single_file

    export_single_file(model, single_file_path(out), dtype=torch.float32)
    return out


def single_file_path(folder: str | Path) -> Path:
    """Where ``make_tiny`` puts the single file of the stand-in written to ``folder``."""
    folder = Path(folder)
    return folder.with_name(folder.name + ".safetensors")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m difftrain.tiny",
        description="Write a tiny random Stable Diffusion stand-in: a diffusers folder OUT "
        "and an A1111-layout single file OUT.safetensors.",
    )
    parser.add_argument("family", choices=sorted(TINY_FAMILIES), help="which family to imitate")
    parser.add_argument("out", type=Path, help="folder to write (OUT.safetensors goes beside it)")
    parser.add_argument("--seed", type=int, default=0, help="weights are deterministic per seed")
    args = parser.parse_args(argv)
    with exit_on_user_error(parser.prog):
        folder = make_tiny(args.family, args.out, seed=args.seed)
        say(f"wrote {folder}/ and {single_file_path(folder)}")


if __name__ == "__main__":
    main()
