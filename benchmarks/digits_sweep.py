"""Train digits generators under a fixed optimizer-step budget and score them at several guidance scales.

Used to choose the defaults of ``configs/digits/mar.yaml`` (step budget = what fits the demo's 2-core CPU time).
Prints one JSON line per configuration:

    python benchmarks/digits_sweep.py --steps 1000 --set width=128 --set dropout=0.0
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging

from lightning_ar import GenerationMetrics, LatentDataModule, MARGenerator

BASE = dict(patch_size=2, width=128, encoder_depth=3, decoder_depth=3, num_heads=4, head_width=128, head_depth=3,
            diffusion_batch_mul=4, dropout=0.1, num_iter=8)


def _value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def run(steps: int, lr: float, batch_size: int, cfgs: list[float], ema: float, overrides: dict,
        precision: str = "32-true") -> dict:
    L.seed_everything(0, verbose=False)
    dm = LatentDataModule("digits", batch_size=batch_size)
    warmup = min(200, steps // 5)
    model = MARGenerator(
        dm.latent_shape, dm.num_classes, dm.latent_scale, **{**BASE, **overrides},
        optimizer=lambda p: torch.optim.AdamW(p, lr=lr, betas=(0.9, 0.95), weight_decay=0.02),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LinearLR(o, 0.01, total_iters=warmup),
    )
    variants = {f"cfg{c}": {"cfg": c} for c in cfgs}
    variants["cfg3_iter16"] = {"cfg": 3.0, "num_iter": 16}
    variants["cfg3_t0.9"] = {"cfg": 3.0, "temperature": 0.9}
    metrics = GenerationMetrics(variants=variants, results_dir=tempfile.mkdtemp())
    trainer = L.Trainer(max_steps=steps, precision=precision, accelerator="auto", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=3.0,
                        callbacks=[EMAWeightAveraging(decay=ema), metrics], num_sanity_val_steps=0,
                        check_val_every_n_epoch=10_000)
    start = time.perf_counter()
    trainer.fit(model, dm)
    fit_s = time.perf_counter() - start
    trainer.test(model, dm, verbose=False)
    params = sum(p.numel() for p in model.parameters())
    return {"overrides": overrides, "steps": steps, "lr": lr, "batch_size": batch_size, "ema": ema,
            "precision": precision, "device": str(model.device),
            "params_m": round(params / 1e6, 3), "fit_s": round(fit_s, 1), "results": metrics.last_results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--cfg", type=float, nargs="+", default=[1.0, 2.0, 3.0, 4.0])
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--set", action="append", default=[], help="model override key=value")
    args = parser.parse_args()
    overrides = {k: _value(v) for k, v in (item.split("=", 1) for item in args.set)}
    result = run(args.steps, args.lr, args.batch_size, args.cfg, args.ema, overrides, args.precision)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
