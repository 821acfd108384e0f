"""vision/: VQGAN codes vs transformers' ChameleonVQVAE, decoder vs a taming decoder assembled from HF's
blocks, processor vs ChameleonImageProcessorPil, vocab vs ChameleonImageVocabularyMapping."""

from __future__ import annotations

import argparse
import copy
import io
import random

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn
from transformers import ChameleonVQVAEConfig
from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
from transformers.models.chameleon.modeling_chameleon import (
    ChameleonImageVocabularyMapping,
    ChameleonVQVAE,
    ChameleonVQVAEEncoderAttnBlock,
    ChameleonVQVAEEncoderResnetBlock,
)

from fuselm.errors import FuselmError
from fuselm.vision import (
    ImageProcessor,
    ImageTokenizer,
    ImageVocab,
    VQGANConfig,
    image_token_name,
    load_meta_vqgan,
    open_image,
    parse_image_token_name,
    vqgan_from_hf_state_dict,
    vqgan_from_state_dict,
    vqgan_state_dict,
)

TINY = dict(base_channels=32, channel_multiplier=[1, 2], resolution=32, embed_dim=16, num_embeddings=64,
            latent_channels=16, num_res_blocks=1)


# ---- references -----------------------------------------------------------------------------------------


def _hf_vq(attn_resolutions=None, seed=0) -> tuple[ChameleonVQVAEConfig, ChameleonVQVAE]:
    """Random HF VQ model whose codebook is spread over the encoder's real outputs (so many codes are used)."""
    cfg = ChameleonVQVAEConfig(**TINY, attn_resolutions=attn_resolutions)
    torch.manual_seed(seed)
    model = ChameleonVQVAE(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        z = model.quant_conv(model.encoder(torch.rand(4, 3, 32, 32) * 2 - 1))
        rows = z.permute(0, 2, 3, 1).reshape(-1, cfg.embed_dim)
        pick = rows[torch.randperm(rows.shape[0])[: cfg.num_embeddings]]
        model.quantize.embedding.weight.copy_(pick + 0.05 * torch.randn_like(pick))
    return cfg, model


class _RefUpsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))


def _ref_decoder(cfg: ChameleonVQVAEConfig) -> nn.Module:
    """taming's Decoder layout (names and wiring), assembled from transformers' Chameleon blocks."""
    ch, mult, nrb = cfg.base_channels, list(cfg.channel_multiplier), cfg.num_res_blocks
    attn_res = cfg.attn_resolutions or []
    d = nn.Module()
    c = ch * mult[-1]
    res = cfg.resolution // 2 ** (len(mult) - 1)
    d.conv_in = nn.Conv2d(cfg.latent_channels, c, 3, padding=1)
    d.mid = nn.Module()
    d.mid.block_1 = ChameleonVQVAEEncoderResnetBlock(cfg, c, c)
    d.mid.attn_1 = ChameleonVQVAEEncoderAttnBlock(c)
    d.mid.block_2 = ChameleonVQVAEEncoderResnetBlock(cfg, c, c)
    ups = []
    for i in reversed(range(len(mult))):
        up = nn.Module()
        up.block, up.attn = nn.ModuleList(), nn.ModuleList()
        for _ in range(nrb + 1):
            up.block.append(ChameleonVQVAEEncoderResnetBlock(cfg, c, ch * mult[i]))
            c = ch * mult[i]
            if res in attn_res:
                up.attn.append(ChameleonVQVAEEncoderAttnBlock(c))
        if i != 0:
            up.upsample = _RefUpsample(c)
            res *= 2
        ups.insert(0, up)
    d.up = nn.ModuleList(ups)
    d.norm_out = nn.GroupNorm(32, c, eps=1e-6)
    d.conv_out = nn.Conv2d(c, 3, 3, padding=1)
    for p in d.parameters():
        nn.init.normal_(p, 0.0, 0.2)
    return d.eval()


@torch.no_grad()
def _ref_decode(hf: ChameleonVQVAE, dec: nn.Module, codes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    z = hf.quantize.embedding(codes).view(codes.shape[0], h, w, -1).permute(0, 3, 1, 2)
    x = dec.conv_in(hf.post_quant_conv(z))
    x = dec.mid.block_2(dec.mid.attn_1(dec.mid.block_1(x)))
    for i in reversed(range(len(dec.up))):
        for j, block in enumerate(dec.up[i].block):
            x = block(x)
            if len(dec.up[i].attn):
                x = dec.up[i].attn[j](x)
        if i != 0:
            x = dec.up[i].upsample(x)
    x = dec.norm_out(x)
    return dec.conv_out(x * torch.sigmoid(x))


@torch.no_grad()
def _hf_codes(hf: ChameleonVQVAE, pixels: torch.Tensor) -> torch.Tensor:
    return hf.encode(pixels).image_tokens.view(pixels.shape[0], -1)


@pytest.fixture(scope="module")
def hf_vq():
    return _hf_vq()


# ---- VQGAN ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_resolutions", [None, [32, 16]])
def test_encoder_codes_match_hf(attn_resolutions):
    cfg, hf = _hf_vq(attn_resolutions)
    ours = vqgan_from_hf_state_dict(cfg.to_dict(), hf.state_dict())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    ref = _hf_codes(hf, x)
    got = ours.encode(x)
    assert got.dtype == torch.long and got.shape == (3, 16 * 16) == ref.shape  # 32 px / 2 -> 16x16 grid
    assert ref.unique().numel() >= 20  # the comparison exercises many codebook rows
    assert torch.equal(got, ref)


def test_hf_full_model_prefix_and_no_decoder(hf_vq):
    cfg, hf = hf_vq
    full = {"model.vqmodel." + k: v for k, v in hf.state_dict().items()}
    full["model.embed_tokens.weight"] = torch.zeros(4, 4)
    ours = vqgan_from_hf_state_dict({"vq_config": cfg.to_dict()}, full)
    assert not ours.has_decoder
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(ours.encode(x), _hf_codes(hf, x))
    with pytest.raises(FuselmError, match="no decoder"):
        ours.decode(torch.zeros(1, 256, dtype=torch.long), 16, 16)


def test_loader_errors(hf_vq):
    cfg, hf = hf_vq
    sd = hf.state_dict()
    missing = {k: v for k, v in sd.items() if k != "quant_conv.weight"}
    with pytest.raises(FuselmError, match="quant_conv.weight"):
        vqgan_from_hf_state_dict(cfg.to_dict(), missing)
    bad = dict(sd, **{"quant_conv.weight": torch.zeros(3, 3, 1, 1)})
    with pytest.raises(FuselmError, match=r"quant_conv.weight.*shape"):
        vqgan_from_hf_state_dict(cfg.to_dict(), bad)
    with pytest.raises(FuselmError, match="attn_type"):
        vqgan_from_hf_state_dict(dict(cfg.to_dict(), attn_type="linear"), sd)


def _write_meta(tmp_path, hf, dec, cfg, extra=None):
    sd = dict(hf.state_dict())
    sd.update({"decoder." + k: v for k, v in dec.state_dict().items()})
    sd["loss.discriminator.main.0.weight"] = torch.zeros(2)  # training leftovers, ignored
    ckpt = {"state_dict": sd, "epoch": 3, "global_step": 100, **(extra or {})}
    torch.save(ckpt, tmp_path / "vqgan.ckpt")
    dd = dict(double_z=False, z_channels=cfg.latent_channels, resolution=cfg.resolution, in_channels=3, out_ch=3,
              ch=cfg.base_channels, ch_mult=list(cfg.channel_multiplier), num_res_blocks=cfg.num_res_blocks,
              attn_resolutions=[], dropout=0.0)
    params = dict(embed_dim=cfg.embed_dim, n_embed=cfg.num_embeddings, ddconfig=dd,
                  lossconfig=dict(target="taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"))
    (tmp_path / "vqgan.yaml").write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel",
                                                                   "params": params}}))
    return tmp_path / "vqgan.ckpt", tmp_path / "vqgan.yaml"


def test_meta_checkpoint_encoder_and_decoder(tmp_path, hf_vq):
    cfg, hf = hf_vq
    dec = _ref_decoder(cfg)
    ckpt, yml = _write_meta(tmp_path, hf, dec, cfg)
    ours = load_meta_vqgan(ckpt, yml)
    assert ours.has_decoder
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    codes = ours.encode(x)
    assert torch.equal(codes, _hf_codes(hf, x))
    out = ours.decode(codes, 16, 16)
    ref = _ref_decode(hf, dec, codes, 16, 16)
    assert out.shape == (2, 3, 32, 32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    # the tokenizer: PIL out, values = round((clamp(x)+1)*127.5) (independent numpy formula)
    tok = ImageTokenizer(ours)
    assert tok.grid == (16, 16) and tok.size == 32
    imgs = tok.decode(codes)
    assert [im.size for im in imgs] == [(32, 32)] * 2 and all(im.mode == "RGB" for im in imgs)
    want = np.round((np.clip(ref.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    assert np.abs(np.stack([np.asarray(im) for im in imgs]).astype(int) - want).max() <= 1
    assert torch.equal(tok.encode(x), codes)

    # a bf16 decoder (the fast path on AMX CPUs) stays close and returns float32
    fast_model = copy.deepcopy(ours)
    fast_model.decoder.to(torch.bfloat16)
    fast = fast_model.decode(codes, 16, 16)
    assert fast.dtype == torch.float32 and (fast - ref).abs().max() < 0.05 * ref.abs().max()

    # state dict and config round trip (for GGUF companions)
    again = vqgan_from_state_dict(VQGANConfig.from_dict(ours.config.to_dict()), vqgan_state_dict(ours))
    assert torch.equal(again.decode(codes, 16, 16), out)


def test_meta_checkpoint_refuses_pickled_code(tmp_path, hf_vq):
    cfg, hf = hf_vq
    ckpt, yml = _write_meta(tmp_path, hf, _ref_decoder(cfg), cfg, extra={"hparams": argparse.Namespace(lr=1)})
    with pytest.raises(FuselmError, match="refusing"):
        load_meta_vqgan(ckpt, yml)


def test_config_defaults_and_dicts():
    hf_default = ChameleonVQVAEConfig().to_dict()
    c = VQGANConfig.from_dict(hf_default)
    assert c == VQGANConfig()
    assert (c.base_channels, c.channel_multiplier, c.num_res_blocks) == (128, (1, 1, 2, 2, 4), 2)
    assert c.attn_resolutions == ()
    assert (c.num_embeddings, c.embed_dim, c.resolution // c.downsample_factor) == (8192, 256, 32)
    assert VQGANConfig.from_dict(c.to_dict()) == c
    with pytest.raises(FuselmError, match="multiples of 32"):
        VQGANConfig(base_channels=48)


def test_encode_input_errors(hf_vq):
    cfg, hf = hf_vq
    ours = vqgan_from_hf_state_dict(cfg.to_dict(), hf.state_dict())
    with pytest.raises(FuselmError, match="multiple of 2"):
        ours.encode(torch.zeros(1, 3, 31, 32))
    with pytest.raises(FuselmError, match="expected float pixels"):
        ours.encode(torch.zeros(3, 32, 32))
    tok = ImageTokenizer(ours)
    with pytest.raises(FuselmError, match=r"\[B, 3, 32, 32\]"):
        tok.encode(torch.zeros(1, 3, 64, 64))


# ---- processor ------------------------------------------------------------------------------------------


def _rgba_image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
    a[: h // 3, :, 3] = 0  # fully transparent band -> white
    a[h // 3 : h // 2, :, 3] = 255
    return Image.fromarray(a, "RGBA")


@pytest.mark.parametrize("w,h", [(45, 37), (37, 45), (40, 40), (20, 90)])
def test_processor_matches_hf(w, h):
    img = _rgba_image(w, h, seed=w * h)
    hf = ChameleonImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref = torch.as_tensor(np.asarray(hf(images=[img], return_tensors="np")["pixel_values"]))
    got = ImageProcessor(32).preprocess([img])
    assert got.shape == ref.shape == (1, 3, 32, 32) and got.dtype == torch.float32
    # HF scales by 0.0078, we (like Meta) by 2/255: recover the uint8 pixels from each and compare exactly.
    torch.testing.assert_close(((ref + 1) / 0.0078).round(), ((got + 1) * 127.5).round(), rtol=0, atol=0)
    # ... so the float values differ by x*(2/255 - 0.0078) <= 0.011 (white: 1.0 vs 0.989).
    assert (got - ref).abs().max().item() <= 255 * (2 / 255 - 0.0078) + 1e-6
    assert got.min() >= -1 and got.max() <= 1


def test_processor_long_side_is_floored_like_hf():
    # 45x37 at 32: 32*45/37 = 38.92 -> HF floors to 38 (Meta would round to 39); an RGB image of a horizontal
    # ramp shows which: the centre crop then starts at column (38-32)//2 = 3.
    ramp = np.tile(np.linspace(0, 255, 45).astype(np.uint8)[None, :, None], (37, 1, 3))
    img = Image.fromarray(ramp, "RGB")
    floor = np.asarray(img.resize((38, 32), Image.Resampling.LANCZOS).crop((3, 0, 35, 32)))
    got = ((ImageProcessor(32).preprocess(img)[0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    assert np.array_equal(got, floor)


def test_processor_round_trip_and_tensor_input():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    p = ImageProcessor(16)
    x = p.preprocess([Image.fromarray(a) for a in arr])
    np.testing.assert_array_equal(x.numpy(), (arr.transpose(0, 3, 1, 2) / 255.0 * 2 - 1).astype(np.float32))
    back = p.postprocess(x)
    assert np.array_equal(np.stack([np.asarray(b) for b in back]), arr)
    assert torch.equal(p.preprocess(x), x)
    with pytest.raises(FuselmError, match=r"within \[-1, 1\]"):
        p.preprocess(x * 3)
    with pytest.raises(FuselmError, match="item 1"):
        p.preprocess([Image.fromarray(arr[0]), "nope"])


def test_open_image_errors(tmp_path):
    good = tmp_path / "ok.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    assert open_image(good).size == (8, 8)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(FuselmError, match="garbage.png"):
        open_image(garbage)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(FuselmError, match="truncated.png"):
        open_image(truncated)
    with pytest.raises(FuselmError, match="not found"):
        open_image(tmp_path / "missing.png")
    with pytest.raises(FuselmError, match="decompression bomb"):
        open_image(good, max_pixels=63)
    with pytest.raises(FuselmError, match="decompression bomb"):
        ImageProcessor(16, max_pixels=63).preprocess(Image.open(good))
    # a real bomb: 96 MP of one colour is a tiny PNG; PIL's own bomb warning must come back as our error
    bomb = tmp_path / "bomb.png"
    Image.new("1", (12000, 8000)).save(bomb)
    with pytest.raises(FuselmError, match="bomb.png.*decompression bomb"):
        open_image(bomb, max_pixels=10**9)


# ---- vocab ----------------------------------------------------------------------------------------------


def _vocab(n: int = 64, seed: int = 0) -> dict[str, int]:
    names = ["<unk>", "<s>", "</s>", "<pad>"] + [image_token_name(i) for i in range(n)]
    random.Random(seed).shuffle(names[4:])  # image ids in a scrambled codebook order
    names += ["<eoss>", "<racm3:break>", "hello", "<reserved08706>", "<image>"]
    return {name: i for i, name in enumerate(names)}


def test_vocab_matches_hf_mapping():
    vocab = _vocab()
    ours = ImageVocab(vocab, num_embeddings=64)
    hf = ChameleonImageVocabularyMapping(vocab)
    assert torch.equal(ours.image_token_ids, torch.tensor(hf.image_tokens))
    codes = torch.arange(64).view(2, 32)
    assert torch.equal(ours.codes_to_ids(codes), hf.convert_img2bpe(codes).long())
    ids = torch.tensor(hf.image_tokens)
    assert ours.ids_to_codes(ids).tolist() == [hf.bpe2img[i] for i in hf.image_tokens]
    assert torch.equal(ours.ids_to_codes(ours.codes_to_ids(codes)), codes)
    mask = ours.is_image_token(torch.tensor([0, 4, 67, 68, 10**6, -1]))
    assert mask.tolist() == [False, True, True, False, False, False]
    assert (ours.eoi_id, ours.boi_id, ours.eot_id) == (68, 69, 71)


def test_image_token_names_match_hf_parsing():
    assert image_token_name(53) == "IMGIMGFDZ"  # example from anole's comments
    names = {image_token_name(i): 4 + i for i in range(8192)}
    hf = ChameleonImageVocabularyMapping(names)
    assert all(hf.bpe2img[4 + i] == i for i in range(8192))
    assert [parse_image_token_name(image_token_name(i)) for i in (0, 9, 10, 8191)] == [0, 9, 10, 8191]


def test_vocab_errors():
    v = _vocab()
    with pytest.raises(FuselmError, match="codebook has 65"):
        ImageVocab(v, num_embeddings=65)
    gap = dict(v)
    del gap[image_token_name(5)]
    with pytest.raises(FuselmError, match=r"missing \[5\], beyond the range \[63\]"):
        ImageVocab(gap)
    dup = dict(v)
    del dup[image_token_name(63)]
    dup["IMGIMGAAZ"] = 500  # another spelling of index 0
    with pytest.raises(FuselmError, match="index 0 appears twice"):
        ImageVocab(dup)
    bad = dict(v, IMGIMGxyZ=600)
    with pytest.raises(FuselmError, match="IMGIMGxyZ"):
        ImageVocab(bad)
    for special in ("<racm3:break>", "<eoss>", "<reserved08706>"):
        with pytest.raises(FuselmError, match=special):
            ImageVocab({k: i for k, i in v.items() if k != special})
    ok = ImageVocab(v)
    with pytest.raises(FuselmError, match="not image tokens"):
        ok.ids_to_codes(torch.tensor([4, 1]))
    with pytest.raises(FuselmError, match=r"\[0, 64\)"):
        ok.codes_to_ids(torch.tensor([64]))
