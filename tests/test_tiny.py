"""The tiny Stable Diffusion stand-ins: loadable by diffusers, family-shaped, deterministic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from difftrain.models.metadata import EMBEDDED_CONFIG_KEY  # noqa: E402
from difftrain.tiny import build_tiny_pipeline, main, single_file_path  # noqa: E402

FIXTURE_OF = {"sd15": "tiny_sd15", "sd2-v": "tiny_sd2v", "sdxl": "tiny_sdxl"}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


@pytest.mark.parametrize("family", ["sd15", "sd2-v", "sdxl"])
def test_folder_loads_in_the_matching_pipeline_and_generates(family, request):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(FIXTURE_OF[family])
    pipeline_class = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipeline = pipeline_class.from_pretrained(folder, local_files_only=True)
    assert type(pipeline) is pipeline_class
    images = pipeline(
        prompt=["a photo of a cat"],
        num_inference_steps=2,
        guidance_scale=3.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 32, 32, 3)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1
    expected = "v_prediction" if family == "sd2-v" else "epsilon"
    assert pipeline.scheduler.config.prediction_type == expected


def test_families_keep_their_distinguishing_structure(tiny_sd15, tiny_sd2v, tiny_sdxl):
    def config(folder: Path, component: str) -> dict:
        return json.loads((folder / component / "config.json").read_text())

    sd1, sd2, xl = config(tiny_sd15, "unet"), config(tiny_sd2v, "unet"), config(tiny_sdxl, "unet")
    assert not sd1["use_linear_projection"] and isinstance(sd1["attention_head_dim"], int)
    assert sd2["use_linear_projection"] and isinstance(sd2["attention_head_dim"], list)
    assert xl["addition_embed_type"] == "text_time" and xl["transformer_layers_per_block"] == [1, 2]
    assert xl["down_block_types"][0] == "DownBlock2D"  # SDXL's first level has no attention
    assert config(tiny_sd15, "text_encoder")["hidden_act"] == "quick_gelu"
    assert config(tiny_sd2v, "text_encoder")["hidden_act"] == "gelu"
    assert (tiny_sdxl / "text_encoder_2").is_dir() and not (tiny_sd15 / "text_encoder_2").exists()
    # SDXL's UNet reads both encoders' hidden states concatenated, plus the pooled projection.
    te1, te2 = config(tiny_sdxl, "text_encoder"), config(tiny_sdxl, "text_encoder_2")
    assert xl["cross_attention_dim"] == te1["hidden_size"] + te2["hidden_size"]
    assert xl["projection_class_embeddings_input_dim"] == 6 * xl["addition_time_embed_dim"] + te2["projection_dim"]


@pytest.mark.parametrize(
    "family, present",
    [
        ("sd15", "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"),
        ("sd2-v", "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"),
        ("sdxl", "conditioner.embedders.1.model.text_projection"),
    ],
)
def test_single_file_uses_the_original_layout_and_describes_itself(family, present, request):
    from safetensors import safe_open

    path = single_file_path(request.getfixturevalue(FIXTURE_OF[family]))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    assert present in keys
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert not any("down_blocks" in key or "resnets" in key for key in keys)  # no diffusers names
    assert not any(key.startswith("cond_stage_model.model.") and "q_proj" in key for key in keys)  # fused
    description = json.loads(metadata[EMBEDDED_CONFIG_KEY])
    assert description["family"] == {"sd15": "sd1", "sd2-v": "sd2", "sdxl": "sdxl"}[family]
    assert description["prediction_type"] == ("v_prediction" if family == "sd2-v" else "epsilon")
    assert {"unet", "vae", "text_encoder", "scheduler"} <= set(description["configs"])
    assert description["tokenizers"]["tokenizer"]  # the files themselves, for offline loading


def test_weights_are_a_function_of_the_seed():
    first = build_tiny_pipeline("sd15", seed=3).unet.state_dict()
    again = build_tiny_pipeline("sd15", seed=3).unet.state_dict()
    other = build_tiny_pipeline("sd15", seed=4).unet.state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_building_does_not_disturb_the_callers_random_stream():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_pipeline("sd15")
    assert torch.equal(torch.rand(3), expected)


def test_tokenizer_covers_any_text_and_pads_to_77(tiny_sd15):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer", local_files_only=True)
    ids = tokenizer("a photo of the cat, ünïcode 漢字", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77
    assert tokenizer.unk_token_id not in ids[1 : ids.index(tokenizer.eos_token_id)]
    # Merges make common words one token each, so BPE is really exercised.
    assert len(tokenizer("photo").input_ids) == 3


def test_command_line_writes_folder_and_single_file(tmp_path, capsys):
    main(["sd2", str(tmp_path / "model"), "--seed", "1"])
    assert (tmp_path / "model" / "model_index.json").exists()
    assert (tmp_path / "model.safetensors").exists()
    scheduler = json.loads((tmp_path / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "epsilon"  # plain 'sd2' is the 512 epsilon base
    assert "model.safetensors" in capsys.readouterr().err


def test_command_line_rejects_an_unknown_family(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["sd3", str(tmp_path / "model")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "model").exists()
