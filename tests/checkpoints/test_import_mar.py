"""Import of official MAR checkpoints (`lightning-ar import-mar`) and the ImageNet configs.

The official layout is written out here from MAR's module structure (models/mar.py, models/diffloss.py) and checked
against the reference shapes of MAR-B; a functional re-implementation of MAR's forward then checks that imported
weights compute exactly what MAR computes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers.official_mar import official_layout, random_official
from helpers.tiny import save_generator_checkpoint
from omegaconf import OmegaConf

from lightning_ar import MARGenerator, OTRefinement, SamplingOptions
from lightning_ar.checkpoints import MAR_LATENT_SCALE, MARSize, convert_state_dict, import_mar_checkpoint
from lightning_ar.cli import _register_resolvers, build_cli, main

REPO = Path(__file__).resolve().parents[2]
# MAR's parameter names and shapes (a format description, vendored with the tests: they read nothing outside the repo)
REFERENCE = Path(__file__).resolve().parents[1] / "assets" / "mar_state_dict_shapes.json"
TINY = MARSize(width=32, depth=2, num_heads=4, head_width=24, head_depth=2, cfg=2.0)


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


def test_official_layout_matches_reference_mar_base() -> None:
    ref = _reference()["mar_base"]["state_dict"]
    mine = official_layout(768, 12, 1024, 6, 16, 256, 64, 1000)
    assert {k: list(v) for k, v in mine.items()} == ref


@pytest.mark.parametrize("size", ["base", "large", "huge"])
def test_reference_shapes_map_exactly(size: str) -> None:
    """Every official key of MAR-B/L/H lands on a generator key of the same shape (meta tensors: no memory)."""
    from lightning_ar.checkpoints import generator_hparams

    entry = _reference()[f"mar_{size}"]
    official = {k: torch.empty(v, device="meta") for k, v in entry["state_dict"].items()}
    hparams = generator_hparams(official, size)
    assert hparams["latent_shape"] == (16, 16, 16) and hparams["patch_size"] == 1 and hparams["buffer_size"] == 64
    assert hparams["latent_scale"] == MAR_LATENT_SCALE
    with torch.device("meta"):
        generator = MARGenerator(**hparams)
    converted = convert_state_dict(official, generator)
    assert set(converted) == set(generator.state_dict())
    assert sum(p.numel() for p in generator.parameters()) == entry["n_params"]


# ------------------------------------------------------------------------ independent MAR forward (functional)
def _ln(x, sd, name, affine=True):
    weight, bias = (sd[f"{name}.weight"], sd[f"{name}.bias"]) if affine else (None, None)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps=1e-6)


def _lin(x, sd, name):
    return F.linear(x, sd[f"{name}.weight"], sd[f"{name}.bias"])


def _vit_block(x, sd, name, heads):
    b, n, w = x.shape
    qkv = _lin(_ln(x, sd, f"{name}.norm1"), sd, f"{name}.attn.qkv").reshape(b, n, 3, heads, w // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q @ k.transpose(-2, -1) / math.sqrt(w // heads)).softmax(dim=-1)
    x = x + _lin((attn @ v).transpose(1, 2).reshape(b, n, w), sd, f"{name}.attn.proj")
    return x + _lin(F.gelu(_lin(_ln(x, sd, f"{name}.norm2"), sd, f"{name}.mlp.fc1")), sd, f"{name}.mlp.fc2")


def mar_patchify(latents, p):
    """MAR's patchify: ``n c (h p) (w q) -> n (h w) (c p q)``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def mar_conditions(sd, tokens, mask, labels, buffer, depth, heads):
    """MAR's forward_mae_encoder + forward_mae_decoder in eval mode (labels -1 = fake_latent)."""
    b, seq_len, _ = tokens.shape
    x = _lin(tokens, sd, "z_proj")
    cls = torch.where((labels < 0)[:, None], sd["fake_latent"], sd["class_emb.weight"][labels.clamp(min=0)])
    x = torch.cat([cls[:, None].expand(-1, buffer, -1), x], dim=1) + sd["encoder_pos_embed_learned"]
    x = _ln(x, sd, "z_proj_ln")
    keep = torch.cat([torch.ones(b, buffer, dtype=torch.bool), ~mask], dim=1)
    x = x[keep].reshape(b, -1, x.shape[-1])
    for i in range(depth):
        x = _vit_block(x, sd, f"encoder_blocks.{i}", heads)
    x = _lin(_ln(x, sd, "encoder_norm"), sd, "decoder_embed")
    full = sd["mask_token"].expand(b, buffer + seq_len, -1).clone()
    full[keep] = x.reshape(-1, x.shape[-1])
    x = full + sd["decoder_pos_embed_learned"]
    for i in range(depth):
        x = _vit_block(x, sd, f"decoder_blocks.{i}", heads)
    return _ln(x, sd, "decoder_norm")[:, buffer:] + sd["diffusion_pos_embed_learned"]


def mar_head(sd, x, t, z, depth):
    """MAR's SimpleMLPAdaLN (timestep embedding: cos then sin, 256 frequencies)."""
    p = "diffloss.net."
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    args = t[:, None].float() * freqs[None]
    t_emb = _lin(F.silu(_lin(torch.cat([torch.cos(args), torch.sin(args)], -1), sd, p + "time_embed.mlp.0")), sd,
                 p + "time_embed.mlp.2")
    y = t_emb + _lin(z, sd, p + "cond_embed")
    h = _lin(x, sd, p + "input_proj")
    for i in range(depth):
        b = f"{p}res_blocks.{i}."
        shift, scale, gate = _lin(F.silu(y), sd, b + "adaLN_modulation.1").chunk(3, dim=-1)
        inner = _ln(h, sd, b + "in_ln") * (1 + scale) + shift
        h = h + gate * _lin(F.silu(_lin(inner, sd, b + "mlp.0")), sd, b + "mlp.2")
    shift, scale = _lin(F.silu(y), sd, p + "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return _lin(_ln(h, sd, "", affine=False) * (1 + scale) + shift, sd, p + "final_layer.linear")


# ----------------------------------------------------------------------------------------------- tiny imports
@pytest.fixture(scope="module")
def tiny_import(tmp_path_factory) -> tuple[dict, Path, Path]:
    """A tiny official-layout checkpoint (16x16x16 latents, patch 2: 64 tokens of dim 64) imported to a .ckpt."""
    root = tmp_path_factory.mktemp("import")
    model, ema = random_official(0), random_official(1)
    source = root / "checkpoint-last.pth"
    torch.save({"model": model, "model_ema": ema, "epoch": 799}, source)
    out = import_mar_checkpoint(source, TINY, root / "tiny.ckpt")
    return ema, source, out


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(3, 16, 16, 16, generator=g)
    order = torch.stack([torch.randperm(64, generator=g) for _ in range(3)])
    mask = torch.zeros(3, 64, dtype=torch.bool).scatter_(1, order[:, :40], True)
    return latents, mask, torch.tensor([2, 7, -1])


def test_imported_generator_computes_mar_forward(tiny_import) -> None:
    """Our transformer and head on imported weights equal an independent implementation of MAR's forward."""
    official, _, out = tiny_import
    gen = MARGenerator.load_from_checkpoint(out, map_location="cpu").eval()
    assert gen.hparams.patch_size == 2 and gen.latent_shape == (16, 16, 16)
    latents, mask, labels = _inputs()
    with torch.no_grad():
        ours = gen.mar(patchify_ours(latents), mask, labels)
        ref = mar_conditions(official, mar_patchify(latents, 2), mask, labels, buffer=4, depth=2, heads=4)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
        z, t = ref[mask][:8], torch.tensor([0, 1, 10, 99, 250, 500, 990, 999])
        x_official = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))  # (c p q) token layout
        head_ref = mar_head(official, x_official, t, z, depth=2)  # (8, 128): noise then variance, (c p q)
        perm = ours_to_official_index()
        head_ours = gen.head.net(x_official[:, perm], t, z)
        torch.testing.assert_close(head_ours, torch.cat([head_ref[:, :64][:, perm], head_ref[:, 64:][:, perm]], 1),
                                   rtol=1e-5, atol=1e-5)


def patchify_ours(latents):
    from lightning_ar.nn.mar import patchify

    return patchify(latents, 2)


def ours_to_official_index() -> torch.Tensor:
    """Index of each of our ``(p q c)`` token coordinates in MAR's ``(c p q)`` layout, found from patchify itself."""
    probe = torch.arange(16 * 2 * 2, dtype=torch.float32).reshape(1, 16, 2, 2)  # one patch, values = flat index
    official, ours = mar_patchify(probe, 2)[0, 0], patchify_ours(probe)[0, 0]
    return torch.stack([(official == v).nonzero()[0, 0] for v in ours])


def mar_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """IDDPM's ``space_timesteps(num_timesteps, str(count))`` (one section), which MAR's ``create_diffusion`` uses."""
    stride = (num_timesteps - 1) / (count - 1)
    return sorted({round(i * stride) for i in range(count)})


def mar_cosine_alphas_cumprod(num_timesteps: int) -> torch.Tensor:
    """IDDPM's "cosine" schedule (betas capped at 0.999), cumulated, float64."""
    def abar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - abar((i + 1) / num_timesteps) / abar(i / num_timesteps), 0.999) for i in range(num_timesteps)]
    return torch.cumprod(1 - torch.tensor(betas, dtype=torch.float64), 0)


def mar_respaced_sample(model, z, z_null, cfg, noises, steps: int, temperature: float) -> torch.Tensor:
    """MAR's DiffLoss.sample: respaced GaussianDiffusion.p_sample_loop with learned-range variance, CFG on the noise
    (the variance of the conditional half), ``temperature`` on the injected noise, no noise at the last step.
    ``model(x, t, z)`` is the head on original timesteps; ``noises[0]`` starts the chain, ``noises[k]`` is step k's."""
    use = mar_space_timesteps(1000, steps)
    ab = mar_cosine_alphas_cumprod(1000)[use]
    ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
    betas = 1 - ab / ab_prev
    post_var = betas * (1 - ab_prev) / (1 - ab)
    post_log_var = torch.log(torch.cat([post_var[1:2], post_var[1:]]))
    coef_x0, coef_xt = betas * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - betas).sqrt() / (1 - ab)
    x, n = noises[0].double(), z.shape[0]
    for k, i in enumerate(reversed(range(len(use)))):
        t = torch.full((2 * n,), use[i])
        out = model(torch.cat([x, x]).float(), t, torch.cat([z, z_null])).double()
        eps, v = out[:, : x.shape[1]], out[:n, x.shape[1]:]
        eps = eps[n:] + cfg * (eps[:n] - eps[n:])
        frac = (v + 1) / 2
        log_var = frac * torch.log(betas[i]) + (1 - frac) * post_log_var[i]
        pred_x0 = (x - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt()
        mean = coef_x0[i] * pred_x0 + coef_xt[i] * x
        x = mean + torch.exp(0.5 * log_var) * noises[k + 1].double() * temperature if i > 0 else mean
    return x.float()


def test_imported_head_samples_as_mar_respaced_ddpm(tiny_import) -> None:
    """The imported model's head sampler is MAR's: linspace-respaced timesteps (0, 10, ..., 999), respaced betas,
    learned-range variance, CFG and temperature, computed against the independent MAR head implementation."""
    official, _, out = tiny_import
    gen = MARGenerator.load_from_checkpoint(out, map_location="cpu").eval()
    assert gen.hparams.timestep_spacing == "linspace"
    steps = 20
    timesteps = sorted(int(t) for t in gen.head._scheduler("ddpm", steps, torch.device("cpu")).timesteps)
    assert timesteps == mar_space_timesteps(1000, steps)
    perm = ours_to_official_index()

    def mar_model(x_ours, t, z):  # MAR's head in its (c p q) layout, inputs and outputs in ours
        x_off = torch.empty_like(x_ours)
        x_off[:, perm] = x_ours
        y = mar_head(official, x_off, t, z, depth=2)
        return torch.cat([y[:, :64][:, perm], y[:, 64:][:, perm]], 1)

    g = torch.Generator().manual_seed(5)
    z, z_null = torch.randn(6, 32, generator=g), torch.randn(6, 32, generator=g)
    with torch.no_grad():
        options = SamplingOptions(cfg=2.5, temperature=0.9, sampler="ddpm", num_sampling_steps=steps)
        ours = gen.head.sample(z, z_null, options, generator=torch.Generator().manual_seed(11))
        draws = torch.Generator().manual_seed(11)  # the same draws in the same order: start, then one per step
        noises = [torch.randn(6, 64, generator=draws) for _ in range(steps)]
        ref = mar_respaced_sample(mar_model, z, z_null, 2.5, noises, steps, temperature=0.9)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_round_trip_preserves_conditions_and_every_parameter(tiny_import) -> None:
    official, _, out = tiny_import
    hparams = torch.load(out, weights_only=False)["hyper_parameters"]
    assert hparams.pop("_class_path") == "lightning_ar.MARGenerator"  # what LightningCLI's --ckpt_path reads
    fresh = MARGenerator(**hparams)
    fresh.load_state_dict(convert_state_dict(official, fresh))
    loaded = MARGenerator.load_from_checkpoint(out, map_location="cpu")
    for name, value in fresh.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    latents, mask, labels = _inputs(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval().mar(patchify_ours(latents), mask, labels),
                                   fresh.eval().mar(patchify_ours(latents), mask, labels), rtol=0, atol=0)
    checkpoint = torch.load(out, weights_only=False)
    assert {"state_dict", "hyper_parameters", "pytorch-lightning_version"} <= set(checkpoint)


def test_default_is_ema_and_model_selectable(tiny_import, tmp_path) -> None:
    ema, source, out = tiny_import
    model_out = import_mar_checkpoint(source, TINY, tmp_path / "model.ckpt", which="model")
    ema_sd = torch.load(out, weights_only=False)["state_dict"]
    model_sd = torch.load(model_out, weights_only=False)["state_dict"]
    assert torch.equal(ema_sd["mar.null_class_emb"], ema["fake_latent"])
    assert torch.equal(model_sd["mar.null_class_emb"], torch.load(source)["model"]["fake_latent"])


def test_missing_ema_falls_back_to_model_with_message(tmp_path, capsys) -> None:
    model = random_official(0)
    torch.save({"model": model, "model_ema": None}, tmp_path / "c.pth")
    out = import_mar_checkpoint(tmp_path / "c.pth", TINY, tmp_path / "c.ckpt")
    assert "no 'model_ema'" in capsys.readouterr().err
    assert torch.equal(torch.load(out, weights_only=False)["state_dict"]["mar.mask_token"], model["mask_token"])


def test_refinement_accepts_imported_checkpoint(tiny_import) -> None:
    refinement = OTRefinement(generator=str(tiny_import[2]), bank_capacity=8, heldout_capacity=8)
    assert refinement.mar_generator.hparams.latent_scale == MAR_LATENT_SCALE
    assert refinement.bank.conditions.shape[0] == 64  # one bank per AR step (num_iter 64)


def test_safetensors_state_dict_imports_like_torch_save(tiny_import, tmp_path) -> None:
    """MAR weights as a ``.safetensors`` state dict: the same mapping and checks give the same checkpoint."""
    from safetensors.torch import save_file

    ema, _, out = tiny_import
    save_file(ema, tmp_path / "mar_tiny.safetensors")
    save_file(ema, tmp_path / "no_suffix.bin")  # recognised by its header, not only by the suffix
    expected = torch.load(out, weights_only=False)
    for source in ("mar_tiny.safetensors", "no_suffix.bin"):
        got = torch.load(import_mar_checkpoint(tmp_path / source, TINY, tmp_path / f"{source}.ckpt"),
                         weights_only=False)
        assert got["hyper_parameters"] == expected["hyper_parameters"]
        assert set(got["state_dict"]) == set(expected["state_dict"])
        for name, value in expected["state_dict"].items():
            assert torch.equal(got["state_dict"][name], value), name
    # the same checks as for torch.save files: wrong size, missing keys, unreadable file
    with pytest.raises(ValueError, match=r"--size base expects .*has \(32, 2, 2, 24, 2\)"):
        main(["import-mar", "--checkpoint", str(tmp_path / "mar_tiny.safetensors"), "--size", "base",
              "--out", str(tmp_path / "o.ckpt")])
    bad = dict(ema)
    bad.pop("decoder_norm.bias")
    save_file(bad, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=r"missing keys \['decoder_norm.bias'\]"):
        import_mar_checkpoint(tmp_path / "bad.safetensors", TINY, tmp_path / "bad.ckpt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        import_mar_checkpoint(tmp_path / "broken.safetensors", TINY, tmp_path / "broken.ckpt")


# ------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda sd: sd.pop("decoder_norm.bias"), r"missing keys \['decoder_norm.bias'\]"),
        (lambda sd: sd.update({"mask_token": torch.zeros(1, 1, 31)}), r"wrong shapes \['mask_token \(1, 1, 31\)"),
        (lambda sd: sd.update({"extra.weight": torch.zeros(1)}), r"unused keys \['extra.weight'\]"),
        (lambda sd: sd.pop("diffloss.net.res_blocks.1.in_ln.weight"), "diffloss.net.res_blocks.1.in_ln.weight"),
    ],
)
def test_mismatch_names_the_keys(edit, message, tmp_path) -> None:
    sd = random_official(0)
    edit(sd)
    torch.save({"model_ema": sd}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match=message):
        import_mar_checkpoint(tmp_path / "bad.pth", TINY, tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_wrong_size_and_bad_files(tmp_path) -> None:
    torch.save({"model_ema": random_official(0)}, tmp_path / "tiny.pth")
    with pytest.raises(ValueError, match=r"--size base expects .*\(768, 12, 12, 1024, 6\).*has \(32, 2, 2, 24, 2\)"):
        main(["import-mar", "--checkpoint", str(tmp_path / "tiny.pth"), "--size", "base", "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="--checkpoint"):
        import_mar_checkpoint(tmp_path / "absent.pth", "base", tmp_path / "o.ckpt")
    torch.save({"optimizer": {}}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="no 'model_ema' state dict"):
        import_mar_checkpoint(tmp_path / "empty.pth", "base", tmp_path / "o.ckpt")
    with pytest.raises(ValueError, match="--size must be one of"):
        import_mar_checkpoint(tmp_path / "tiny.pth", "giant", tmp_path / "o.ckpt")


@pytest.mark.slow
def test_cli_imports_full_size_mar_base(tmp_path) -> None:
    """`lightning-ar import-mar` on a MAR-B-layout checkpoint (208M parameters): every tensor lands once, intact."""
    shapes = _reference()["mar_base"]["state_dict"]
    official = {name: torch.full(shape, float(i)) for i, (name, shape) in enumerate(shapes.items())}
    torch.save({"model": {}, "model_ema": official, "args": __import__("argparse").Namespace(model="mar_base")},
               tmp_path / "checkpoint-last.pth")
    main(["import-mar", "--checkpoint", str(tmp_path / "checkpoint-last.pth"), "--size", "base",
          "--out", str(tmp_path / "mar_base.ckpt")])
    gen = MARGenerator.load_from_checkpoint(tmp_path / "mar_base.ckpt", map_location="cpu")
    values = {}
    for name, tensor in gen.state_dict().items():
        assert tensor.min() == tensor.max(), name  # one official tensor, not a mix
        values[name] = int(tensor.flatten()[0])
    assert sorted(values.values()) == list(range(len(shapes)))  # every official tensor used exactly once
    index = {name: i for i, name in enumerate(shapes)}
    expected = {
        "mar.null_class_emb": "fake_latent", "mar.encoder_pos_embed": "encoder_pos_embed_learned",
        "mar.diffusion_pos_embed": "diffusion_pos_embed_learned", "mar.encoder_blocks.11.attn.qkv.weight":
        "encoder_blocks.11.attn.qkv.weight", "head.net.blocks.5.norm.bias": "diffloss.net.res_blocks.5.in_ln.bias",
        "head.net.blocks.0.modulation.1.weight": "diffloss.net.res_blocks.0.adaLN_modulation.1.weight",
        "head.net.final.linear.weight": "diffloss.net.final_layer.linear.weight",
        "head.net.final.modulation.1.bias": "diffloss.net.final_layer.adaLN_modulation.1.bias",
    }
    assert {ours: values[ours] for ours in expected} == {ours: index[off] for ours, off in expected.items()}
    assert gen.hparams.cfg == 2.9 and gen.hparams.width == 768 and gen.hparams.head_depth == 6


# ------------------------------------------------------------------------------------------------ configs
PUBLISHED = {  # width, depth, heads, head width, head depth, cfg, epochs
    "imagenet256/mar_base.yaml": (768, 12, 12, 1024, 6, 2.9, 400),
    "imagenet256/mar_large.yaml": (1024, 16, 16, 1280, 8, 3.0, 800),
    "imagenet256/mar_huge.yaml": (1280, 20, 16, 1536, 12, 3.2, 800),
    "imagenet512/mar_large.yaml": (1024, 16, 16, 1280, 8, 3.0, 800),
}


IMAGENET = [REPO / "configs" / name for name in [*PUBLISHED, "imagenet256/refine_mar_base.yaml"]]


def _name(path: Path) -> str:
    return str(path.relative_to(REPO / "configs"))


def test_imagenet_configs_found() -> None:
    assert all(path.is_file() for path in IMAGENET)


def _on_gmm(config: Path, tmp_path: Path) -> Path:
    """The config with its data section swapped for the embedded gmm source (the latent cache does not exist here)."""
    text = yaml.safe_load(config.read_text())
    text["data"] = {"source": "gmm", "batch_size": 8}
    path = tmp_path / config.name
    path.write_text(yaml.safe_dump(text))
    return path


def _resolved(config: str) -> dict:
    _register_resolvers()
    return OmegaConf.to_container(OmegaConf.load(REPO / "configs" / config), resolve=True)


@pytest.mark.parametrize("config", sorted(PUBLISHED), ids=str)
def test_imagenet_generator_config_has_published_recipe(config: str) -> None:
    resolved = _resolved(config)
    trainer, hp = resolved["trainer"], resolved["model"]["init_args"]
    width, depth, heads, head_width, head_depth, cfg, epochs = PUBLISHED[config]
    assert (hp["width"], hp["encoder_depth"], hp["decoder_depth"], hp["num_heads"]) == (width, depth, depth, heads)
    assert (hp["head_width"], hp["head_depth"], hp["cfg"]) == (head_width, head_depth, cfg)
    assert trainer["max_epochs"] == epochs
    assert (hp["buffer_size"], hp["dropout"], hp["diffusion_batch_mul"], hp["num_iter"]) == (64, 0.1, 4, 64)
    assert hp["patch_size"] == (2 if "512" in config else 1)
    assert (trainer["precision"], trainer["strategy"], trainer["num_nodes"], trainer["gradient_clip_val"]) == (
        "bf16-mixed", "ddp", 1, 3.0)
    ema = next(c for c in trainer["callbacks"] if c["class_path"].endswith("EMAWeightAveraging"))
    assert ema["init_args"]["decay"] == 0.9999
    guard = next(c for c in trainer["callbacks"] if c["class_path"].endswith("NonFiniteLoss"))
    assert guard["init_args"]["policy"] == "stop"
    assert resolved["data"]["cache_dir"] and resolved["data"]["batch_size"] == 64
    # MAR's learning-rate recipe as the run-independent numbers of MAR's README (--blr 1e-4 --warmup_epochs 100) ...
    assert (hp["base_lr"], hp["warmup_epochs"]) == (1e-4, 100) and "lr" not in hp["optimizer"]["init_args"]
    assert "lr_scheduler" not in hp
    # ... and nothing in the file that depends on the world size (MAR's 2048 = 64 x 32 devices, 626 steps/epoch)
    text = (REPO / "configs" / config).read_text()
    assert not any(number in text for number in ("2048", "626", "1281167", "1,281,167", "${mul", "${div"))
    # long runs can be watched: throughput and sample grids
    classes = [c["class_path"].rsplit(".", 1)[-1] for c in trainer["callbacks"]]
    assert {"ThroughputMonitor", "SampleGrid", "LearningRateMonitor"} <= set(classes)


def test_mar_recipe_at_mars_scale() -> None:
    """The recipe with MAR's run (64 per device x 32 devices, ImageNet's 1,281,167 images) gives MAR's numbers."""
    import math

    from lightning_ar.modules.optim import RunGeometry, configure_adamw

    steps = math.ceil(math.ceil(1_281_167 / 32) / 64)
    assert steps == 626
    model = MARGenerator(latent_shape=(16, 4, 4), patch_size=1, width=32, encoder_depth=1, decoder_depth=1,
                         num_heads=2, head_width=32, head_depth=1, base_lr=1e-4, warmup_epochs=100)
    optim = configure_adamw(model, model.no_decay_modules(), None, None, 1e-4, 100, RunGeometry(32, 64, 1, steps))
    assert [g["lr"] for g in optim["optimizer"].param_groups] == [0.0, 0.0]  # MAR's warmup starts from 0 ...
    assert [g["initial_lr"] for g in optim["optimizer"].param_groups] == pytest.approx([8e-4, 8e-4])  # ... to 8e-4
    scheduler = optim["lr_scheduler"]["scheduler"]
    assert scheduler.lr_lambdas[0].warmup_steps == 62_600 and optim["lr_scheduler"]["interval"] == "step"
    assert [scheduler.lr_lambdas[0](s) for s in (0, 31_300, 62_600, 10**6)] == [0.0, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="warmup_epochs and model.lr_scheduler exclude each other"):
        MARGenerator(warmup_epochs=1, lr_scheduler=lambda opt: None)
    with pytest.raises(ValueError, match="model.base_lr must be > 0"):
        MARGenerator(base_lr=0.0)


@pytest.mark.parametrize("config", sorted(PUBLISHED), ids=str)
def test_imagenet_generator_config_runs_through_cli(config: str, tmp_path: Path) -> None:
    """The whole config through the CLI (tiny debug model, gmm data instead of the cache): resolvers, trainer, EMA."""
    args = ["--config", str(_on_gmm(REPO / "configs" / config, tmp_path)), "--config", str(REPO / "configs/debug.yaml")]
    cli = build_cli(args + ["--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, MARGenerator)
    assert "EMAWeightAveraging" in [c.__class__.__name__ for c in cli.trainer.callbacks]
    assert (cli.model.hparams.base_lr, cli.model.hparams.warmup_epochs) == (1e-4, 100)
    optimizer = cli.model.optimizer_factory([{"params": [torch.nn.Parameter(torch.zeros(1))]}])
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["weight_decay"] == 0.02
    assert cli.model.lr_scheduler_factory is None  # the warmup comes from warmup_epochs and the run


def test_refine_config_parses(tmp_path: Path) -> None:
    path = _on_gmm(REPO / "configs/imagenet256/refine_mar_base.yaml", tmp_path)
    ckpt = save_generator_checkpoint(tmp_path / "gen.ckpt", "gmm")
    cli = build_cli(["--config", str(path), "--model.init_args.generator", ckpt,
                     "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert isinstance(cli.model, OTRefinement)
    assert yaml.safe_load((REPO / "configs/imagenet256/refine_mar_base.yaml").read_text())["data"]["latent_scale"] == (
        MAR_LATENT_SCALE)


@pytest.mark.parametrize("config", IMAGENET, ids=_name)
def test_imagenet_config_print_config(config: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert "cache_dir" in capsys.readouterr().out
