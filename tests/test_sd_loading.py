"""Offline SD loading: folders, A1111 single files, .ckpt, bare names, exports, and refusals."""

from __future__ import annotations

import functools
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file


os.environ.setdefault("HF_HUB_OFFLINE", "1")

from difftrain.errors import ConfigError  # noqa: E402
from difftrain.models import sd as sd_module  # noqa: E402
from difftrain.models import single_file as sf  # noqa: E402
from difftrain.models.sd import SDModel, export_single_file, load_sd, sdxl_time_ids  # noqa: E402
from difftrain.tiny import single_file_path  # noqa: E402

FAMILIES = [("sd15", "sd1", "epsilon"), ("sd2-v", "sd2", "v_prediction"), ("sdxl", "sdxl", "epsilon")]
FIXTURE_OF = {"sd15": "tiny_sd15", "sd2-v": "tiny_sd2v", "sdxl": "tiny_sdxl"}


pytestmark = pytest.mark.usefixtures("one_thread")  # (tests/conftest.py)


def weights(model: SDModel) -> dict[str, torch.Tensor]:
    """Every weight of the model under '<component>.<canonical key>'."""
    flat = {}
    for name, module in model.modules().items():
        for key, value in module.state_dict().items():
            if not key.endswith("position_ids"):
                flat[f"{name}.{sf.canonical_text_encoder_key(key)}"] = value
    return flat


def assert_same_weights(a: SDModel, b: SDModel) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k].float(), wb[k].float())]
    assert not different, different[:5]


@pytest.mark.parametrize("tiny, family, prediction_type", FAMILIES)
def test_single_file_loads_with_the_folders_weights(tiny, family, prediction_type, request):
    folder = request.getfixturevalue(FIXTURE_OF[tiny])
    from_folder = load_sd(folder)
    from_file = load_sd(single_file_path(folder))
    assert (from_folder.family, from_folder.prediction_type) == (family, prediction_type)
    assert (from_file.family, from_file.prediction_type) == (family, prediction_type)
    assert from_file.noise_scheduler.config.prediction_type == prediction_type
    assert type(from_file.noise_scheduler).__name__ == "DDPMScheduler"
    assert_same_weights(from_folder, from_file)
    # Same tokenizers too: identical conditioning for the same prompt.
    with torch.no_grad():
        a = from_folder.encode_prompts(["a photo of a dog"])
        b = from_file.encode_prompts(["a photo of a dog"])
    assert torch.equal(a["encoder_hidden_states"], b["encoder_hidden_states"])


@pytest.mark.parametrize("tiny", ["sd15", "sd2-v", "sdxl"])
def test_diffusers_own_converter_reads_our_single_files_identically(tiny, request):
    """An independent check that our key mapping is the A1111 layout everybody else reads."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = request.getfixturevalue(FIXTURE_OF[tiny])
    pipeline_class = StableDiffusionXLPipeline if tiny == "sdxl" else StableDiffusionPipeline
    theirs = pipeline_class.from_single_file(str(single_file_path(folder)), config=str(folder), local_files_only=True)
    ours = load_sd(folder)
    # text_encoder_2 is left out: diffusers' own SDXL OpenCLIP path leaves text_projection
    # unloaded with transformers 5 (SD2 checks the same OpenCLIP mapping without it).
    for name in ("unet", "vae", "text_encoder"):
        a = {sf.canonical_text_encoder_key(k): v for k, v in ours.modules()[name].state_dict().items()}
        b = {sf.canonical_text_encoder_key(k): v for k, v in getattr(theirs, name).state_dict().items()}
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("tiny", ["sd15", "sd2-v", "sdxl"])
def test_export_round_trip_is_exact(tiny, request, tmp_path):
    original = load_sd(request.getfixturevalue(FIXTURE_OF[tiny]))
    path = export_single_file(original, tmp_path / "exported.safetensors", dtype=torch.float32, metadata={"ss_note": "x"})
    reloaded = load_sd(path)
    assert_same_weights(original, reloaded)
    assert (reloaded.family, reloaded.prediction_type) == (original.family, original.prediction_type)
    assert reloaded.unet.config.transformer_layers_per_block == original.unet.config.transformer_layers_per_block


def test_default_export_is_fp16_and_keeps_user_metadata(tiny_sd15, tmp_path):
    from safetensors import safe_open

    model = load_sd(tiny_sd15)
    path = export_single_file(model, tmp_path / "half.safetensors", metadata={"ss_steps": 30})
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata()["ss_steps"] == "30"
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
    reloaded = load_sd(path)  # loads as float32 by default
    expected = model.unet.conv_out.weight.detach().half().float()
    assert torch.equal(reloaded.unet.conv_out.weight, expected)
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # readable like any written file


def test_ckpt_with_state_dict_loads_via_weights_only(tiny_sd15, tmp_path):
    tensors = load_file(str(single_file_path(tiny_sd15)))
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 1234, "epoch": 3}, ckpt)
    # A .ckpt cannot describe itself: its configs and tokenizer come from a folder.
    model = load_sd(ckpt, config_from=tiny_sd15)
    assert_same_weights(model, load_sd(tiny_sd15))


class _WritesAMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_ckpt_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"cond_stage_model.transformer.x": torch.zeros(1)}, "payload": _WritesAMarker(marker)}, ckpt)
    assert not marker.exists()
    with open(ckpt, "rb") as handle:
        assert handle.read(2) == b"PK"  # a genuine torch zip checkpoint, payload pickled inside
    with pytest.raises(ConfigError, match="refused"):
        load_sd(ckpt)
    assert not marker.exists()


def test_a_plain_pickle_payload_would_have_run(tmp_path):
    """The marker technique works: without weights_only the same object writes the file."""
    marker = tmp_path / "ran"
    data = pickle.dumps(_WritesAMarker(marker))
    pickle.loads(data)  # noqa: S301 - deliberately unsafe, on our own object
    assert marker.exists()


def test_truncated_safetensors_is_a_config_error(tiny_sd15, tmp_path):
    data = single_file_path(tiny_sd15).read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match="truncated"):
        load_sd(broken)


def test_truncated_ckpt_is_a_config_error(tiny_sd15, tmp_path):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": load_file(str(single_file_path(tiny_sd15)))}, good)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(ConfigError, match="cannot read"):
        load_sd(broken)


def test_bare_names_are_found_in_search_dirs(tiny_sd15, tmp_path):
    models = tmp_path / "StableDiffusion"
    (models / "sub").mkdir(parents=True)
    (models / "sub" / "mine.safetensors").write_bytes(single_file_path(tiny_sd15).read_bytes())
    by_stem = load_sd("mine", search_dirs=[tmp_path / "nowhere", models])
    assert by_stem.source == models / "sub" / "mine.safetensors"
    by_folder = load_sd(tiny_sd15.name, search_dirs=[tiny_sd15.parent])
    assert by_folder.source == tiny_sd15
    assert_same_weights(by_stem, by_folder)


def test_missing_model_lists_what_the_search_dirs_hold(tmp_path):
    models = tmp_path / "StableDiffusion"
    models.mkdir()
    (models / "other.safetensors").write_bytes(b"")
    (models / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError) as error:
        load_sd("wanted.safetensors", search_dirs=[models, tmp_path / "absent"])
    message = str(error.value)
    assert "wanted.safetensors" in message and "other.safetensors" in message
    assert "notes.txt" not in message and "does not exist" in message


def test_wrong_family_is_refused(tiny_sd15, tiny_sdxl):
    with pytest.raises(ConfigError, match="sd1 checkpoint, but an sdxl"):
        load_sd(single_file_path(tiny_sd15), family="sdxl")
    with pytest.raises(ConfigError, match="sdxl model, but an sd1"):
        load_sd(tiny_sdxl, family="sd15")
    assert load_sd(tiny_sdxl, family="xl").family == "sdxl"


def test_a_file_that_is_no_sd_checkpoint_is_refused(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ConfigError, match="not a Stable Diffusion checkpoint"):
        load_sd(lora)


def _strip_self_description(source: Path, target: Path) -> Path:
    save_file(load_file(str(source)), str(target))  # same tensors, no metadata
    return target


def test_sd2_without_description_assumes_v_prediction_with_a_note(tiny_sd2v, tmp_path, capsys):
    bare = _strip_self_description(single_file_path(tiny_sd2v), tmp_path / "sd2.safetensors")
    assumed = load_sd(bare, config_from=tiny_sd2v)
    assert assumed.prediction_type == "v_prediction"
    assert "assuming v-prediction" in capsys.readouterr().err
    told = load_sd(bare, config_from=tiny_sd2v, prediction_type="epsilon")
    assert told.prediction_type == "epsilon" and told.noise_scheduler.config.prediction_type == "epsilon"
    assert_same_weights(assumed, load_sd(tiny_sd2v))


def test_metadata_prediction_type_is_honoured_and_arguments_override_it(tiny_sd15):
    assert load_sd(tiny_sd15, prediction_type="v_prediction").prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        load_sd(tiny_sd15, prediction_type="sample")


@pytest.mark.parametrize("tiny", ["sd15", "sdxl"])
def test_real_single_file_gets_the_shipped_clip_tokenizers(tiny, request, tmp_path, monkeypatch):
    """A real A1111 file carries no tokenizer; the one built from the shipped vocabulary must
    give CLIP's published token ids, and pad like each family's encoders."""
    folder = request.getfixturevalue(FIXTURE_OF[tiny])
    bare = _strip_self_description(single_file_path(folder), tmp_path / "real.safetensors")
    # The tiny weights do not fit the real component configs; take the tiny's own configs instead.
    family = "sdxl" if tiny == "sdxl" else "sd1"
    monkeypatch.setattr(sd_module, "_shipped_configs", lambda detected, prediction: sd_module._configs_from_folder(folder, family))
    model = load_sd(bare)
    assert [t("a photo of a cat").input_ids for t in model.tokenizers] == \
        [[49406, 320, 1125, 539, 320, 2368, 49407]] * len(model.tokenizers)
    assert all(len(t) == 49408 and t.model_max_length == 77 for t in model.tokenizers)
    assert model.tokenizers[0].pad_token == "<|endoftext|>"
    if tiny == "sdxl":
        assert model.tokenizers[1].pad_token == "!" and model.tokenizers[1].pad_token_id == 0


def test_the_shipped_vocabulary_is_complete():
    from difftrain.models.clip_vocab import byte_symbols, standard_clip_tokenizer

    symbols = byte_symbols()
    assert len(symbols) == len(set(symbols)) == 256 and symbols[0] == "!" and symbols[-1] == chr(256 + 67)
    tokenizer = standard_clip_tokenizer()
    assert tokenizer.convert_ids_to_tokens([0, 256, 49406, 49407]) == ["!", "!</w>", "<|startoftext|>", "<|endoftext|>"]
    ids = tokenizer("Ünïcode emoji 🐈 and   spaces").input_ids  # (CLIP decodes "a," as "a ,")
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "ünïcode emoji 🐈 and spaces"


def test_tiny_weights_do_not_fit_the_shipped_real_configs(tiny_sd15, tmp_path, monkeypatch):
    bare = _strip_self_description(single_file_path(tiny_sd15), tmp_path / "real.safetensors")
    # Tokenizers from the tiny folder, configs from component_configs/ (the real sizes).
    monkeypatch.setattr(sd_module, "_configs_from_folder", lambda folder, family: sd_module._shipped_configs(family, "epsilon"))
    with pytest.raises(ConfigError, match="lacks .* unet weight"):
        load_sd(bare, config_from=tiny_sd15)


@pytest.mark.parametrize(
    "variant, key, shape",
    [
        ("sd1", "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320, 1, 1)),
        ("sd1", "model.diffusion_model.output_blocks.2.1.conv.weight", (1280, 1280, 3, 3)),
        ("sd1", "model.diffusion_model.output_blocks.5.2.conv.weight", (1280, 1280, 3, 3)),
        ("sd1", "model.diffusion_model.input_blocks.9.0.op.weight", (1280, 1280, 3, 3)),
        ("sd1", "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight", (128, 256, 1, 1)),
        ("sd1", "first_stage_model.encoder.mid.attn_1.q.weight", (512, 512, 1, 1)),
        ("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight", (768,)),
        ("sd2-768-v", "model.diffusion_model.input_blocks.1.1.proj_in.weight", (320, 320)),
        ("sd2-768-v", "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight", (3072, 1024)),
        ("sd2-768-v", "cond_stage_model.model.positional_embedding", (77, 1024)),
        ("sdxl", "model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
        ("sdxl", "model.diffusion_model.output_blocks.2.2.conv.weight", (1280, 1280, 3, 3)),
        ("sdxl", "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight", (1280, 2048)),
        ("sdxl", "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight", (3840, 1280)),
        ("sdxl", "conditioner.embedders.1.model.text_projection", (1280, 1280)),
        ("sdxl", "conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc1.weight", (3072, 768)),
    ],
)
def test_shipped_configs_map_to_the_published_key_names(variant, key, shape):
    """The real architectures, built without memory, export to keys found in the real files."""
    family = {"sd1": "sd1", "sd2-768-v": "sd2", "sdxl": "sdxl"}[variant]
    flat = _real_layout_on_meta(variant, family)
    assert key in flat
    assert tuple(flat[key].shape) == shape
    if family == "sd2":
        assert not any("resblocks.23." in k for k in flat)  # SD2 keeps 23 of OpenCLIP-H's 24 layers


@functools.lru_cache(maxsize=None)
def _real_layout_on_meta(variant: str, family: str) -> dict:
    configs = sd_module._shipped_configs(family, "v_prediction" if variant == "sd2-768-v" else "epsilon")
    components = {
        "unet": sd_module._build_unet(configs["unet"]).state_dict(),
        "vae": sd_module._build_vae(configs["vae"]).state_dict(),
    }
    for name in sd_module._text_encoder_names(family):
        encoder = sd_module._build_text_encoder(configs[name], with_projection=name == "text_encoder_2")
        components[name] = {sf.canonical_text_encoder_key(k): v for k, v in encoder.state_dict().items()}
    return sf.components_to_original(family, components, configs)


def test_separate_vae_replaces_the_models_vae(tiny_sd15, tiny_sd2v, tmp_path):
    donor = load_sd(tiny_sd2v)
    as_folder = load_sd(tiny_sd15, vae=tiny_sd2v)
    assert all(torch.equal(a, b) for a, b in zip(as_folder.vae.state_dict().values(), donor.vae.state_dict().values()))
    # A1111-style VAE file: original keys without prefix, plus training-only extras.
    tensors = load_file(str(single_file_path(tiny_sd2v)))
    vae_file = tmp_path / "VAE" / "donor.vae.safetensors"
    vae_file.parent.mkdir()
    vae_only = {k[len("first_stage_model."):]: v for k, v in tensors.items() if k.startswith("first_stage_model.")}
    save_file({**vae_only, "loss.logvar": torch.zeros(())}, str(vae_file))
    as_file = load_sd(tiny_sd15, vae="donor.vae", vae_search_dirs=[vae_file.parent])
    donor_state = donor.vae.state_dict()
    assert all(torch.equal(v, donor_state[k]) for k, v in as_file.vae.state_dict().items())
    untouched = load_sd(tiny_sd15)
    assert torch.equal(as_file.unet.conv_in.weight, untouched.unet.conv_in.weight)


def test_separate_text_encoder_replaces_the_matching_one(tiny_sdxl, tmp_path):
    from difftrain.tiny import make_tiny

    donor_folder = make_tiny("sdxl", tmp_path / "donor", seed=1)
    donor = load_sd(donor_folder)
    tensors = load_file(str(single_file_path(donor_folder)))
    te_file = tmp_path / "clip_g.safetensors"
    save_file({k: v for k, v in tensors.items() if k.startswith("conditioner.embedders.1.")}, str(te_file))
    model = load_sd(tiny_sdxl, text_encoder=te_file)
    base = load_sd(tiny_sdxl)
    swapped = weights(model)
    assert all(torch.equal(v, swapped[k]) for k, v in weights(donor).items() if k.startswith("text_encoder_2."))
    assert all(torch.equal(v, swapped[k]) for k, v in weights(base).items() if not k.startswith("text_encoder_2."))


def test_text_encoder_of_another_architecture_is_refused(tiny_sd15, tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel

    wider = CLIPTextModel(CLIPTextConfig(vocab_size=527, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
    path = tmp_path / "wide_te.safetensors"
    save_file({k: v.contiguous() for k, v in wider.state_dict().items()}, str(path))
    with pytest.raises(ConfigError, match="fits none"):
        load_sd(tiny_sd15, text_encoder=path)


@pytest.mark.parametrize("tiny", ["sd15", "sd2-v", "sdxl"])
def test_conditioning_drives_the_unet_and_latents_round_trip(tiny, request):
    model = load_sd(request.getfixturevalue(FIXTURE_OF[tiny]))
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        posterior = model.vae.encode(pixels).latent_dist
        latents = model.scale_latents(posterior.sample(generator=torch.Generator().manual_seed(0)))
        assert latents.shape == (2, 4, 16, 16)
        assert torch.allclose(model.scale_latents(posterior.mean), posterior.mean * model.vae.config.scaling_factor)
        assert torch.allclose(model.decode_latents(model.scale_latents(posterior.mean)),
                              model.vae.decode(posterior.mean).sample, atol=1e-5)
        assert model.decode_latents(latents).shape == (2, 3, 32, 32)
        cond = model.encode_prompts(["a cat", "a dog"])
        prediction = model.unet(latents, torch.tensor([10, 500]), **cond).sample
    assert prediction.shape == latents.shape
    if model.family == "sdxl":
        assert cond["encoder_hidden_states"].shape == (2, 77, 64)
        assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 32)
        assert cond["added_cond_kwargs"]["time_ids"].tolist()[0] == [32, 32, 0, 0, 32, 32]
    else:
        assert set(cond) == {"encoder_hidden_states"}


def test_sdxl_time_ids_change_the_prediction(tiny_sdxl):
    model = load_sd(tiny_sdxl)
    latents = torch.randn(1, 4, 16, 16)
    ids = sdxl_time_ids([(64, 48)], [(4, 0)], [(32, 32)])
    assert ids.tolist() == [[64, 48, 4, 0, 32, 32]]
    with torch.no_grad():
        default = model.unet(latents, 10, **model.encode_prompts(["x"])).sample
        custom = model.unet(latents, 10, **model.encode_prompts(["x"], time_ids=ids)).sample
    assert not torch.allclose(default, custom)


@pytest.mark.parametrize("tiny", ["sd15", "sdxl"])
def test_save_pretrained_and_to_pipeline(tiny, request, tmp_path):
    from diffusers import DiffusionPipeline

    model = load_sd(single_file_path(request.getfixturevalue(FIXTURE_OF[tiny])))
    images = model.to_pipeline()(prompt="a cat", num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 32, 32, 3)
    saved = model.save_pretrained(tmp_path / "out")
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if tiny == "sdxl" else "StableDiffusionPipeline")
    assert_same_weights(model, load_sd(saved))
    assert DiffusionPipeline.from_pretrained(saved, local_files_only=True) is not None
    with pytest.raises(ConfigError, match="already exists"):
        model.save_pretrained(saved)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no staging left behind


def test_dtype_argument_casts_every_module(tiny_sd15):
    model = load_sd(tiny_sd15, dtype=torch.bfloat16)
    assert {p.dtype for module in model.modules().values() for p in module.parameters()} == {torch.bfloat16}


@pytest.mark.slow  # builds a full-size SD1.5 (about 1.1 B parameters) on the CPU: about a minute
def test_a_full_size_a1111_file_loads_with_nothing_but_the_project(tmp_path):
    """What a user's v1-5-pruned.safetensors looks like (original keys, no metadata, fp16): random
    weights of the real architecture, loaded with the shipped configs and tokenizer."""
    configs = sd_module._shipped_configs("sd1", "epsilon")
    torch.manual_seed(0)
    components = {"unet": sd_module._build_unet(configs["unet"]).state_dict(),
                  "vae": sd_module._build_vae(configs["vae"]).state_dict()}
    encoder = sd_module._build_text_encoder(configs["text_encoder"], with_projection=False)
    components["text_encoder"] = {sf.canonical_text_encoder_key(k): v for k, v in encoder.state_dict().items()}
    original = sf.components_to_original("sd1", components, configs)
    path = tmp_path / "v1-5-like.safetensors"
    # The builders make meta tensors (no memory); give every one random values.
    original = {key: (torch.randn(value.shape) * 0.02).half() for key, value in original.items()}
    save_file(original, str(path))
    del components, encoder

    model = load_sd(path)
    assert (model.family, model.prediction_type) == ("sd1", "epsilon")
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(model.unet.down_blocks[0].attentions[0].proj_in.weight, original[key].float())
    ids = model.tokenize(["a photo of a cat"])[0]
    assert ids.shape == (1, 77) and ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    with torch.no_grad():
        hidden = model.text_encoders[0](ids).last_hidden_state
    assert hidden.shape == (1, 77, 768) and torch.isfinite(hidden).all()
