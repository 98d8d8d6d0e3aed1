"""CUDA correctness of the generator: device placement, seeded reproduction, CPU/CUDA agreement, bf16 training.

    python benchmarks/cuda_check.py   # prints one JSON document; exits non-zero on a failed check
"""

from __future__ import annotations

import json
import sys

import torch

from lightning_ar import MARGenerator


def _refinement_check(gen: MARGenerator, device: str = "cuda") -> dict:
    """OTRefinement on CUDA: banks by teacher forcing, flow-refined generation with a trace."""
    from lightning_ar import GenerationTrace, OTRefinement

    gen.eval()
    module = OTRefinement(gen, bank_capacity=512, heldout_capacity=256, target_size=256, flow_steps=5).to(device)
    latents, labels = torch.randn(256, 1, 8, 8, device=device), torch.arange(256, device=device) % 10
    g = torch.Generator(device).manual_seed(0)
    module.fill_bank(module.bank, latents, labels, g)
    module.fill_bank(module.heldout, latents.flip(0), labels.flip(0), g)
    trace = GenerationTrace()
    out = module.generate(labels[:40], refine="flow", trace=trace, generator=torch.Generator(device).manual_seed(1))
    traces = [r.flow_trace for r in trace.steps if r.flow_trace is not None and r.flow_trace[0] > 1e-6]
    return {
        "refined_generate_on_cuda": out.device.type == device and bool(torch.isfinite(out).all()),
        "flow_lowers_own_divergence": all(float(t[-1]) < float(t[0]) for t in traces),
        "divergence_before_after": [(r.divergence_before, r.divergence_after) for r in trace.steps],
    }


def _flow_field_check(device: str = "cuda") -> dict:
    """The refinement's fused Sinkhorn field: CUDA equals CPU, and a bf16 autocast region does not change it."""
    from lightning_ar.nn.sinkhorn import divergence_flow_field

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(96, 40, generator=g), torch.randn(400, 40, generator=g) + 0.3
    a, b = torch.full((96,), 1 / 96), torch.full((400,), 1 / 400)
    cpu = divergence_flow_field(x, y, a, b, 0.5, 0.3, 10.0, 32)
    args = [t.to(device) for t in (x, y, a, b)]
    gpu = divergence_flow_field(*args, 0.5, 0.3, 10.0, 32)
    with torch.autocast(device, dtype=torch.bfloat16):
        gpu_autocast = divergence_flow_field(*args, 0.5, 0.3, 10.0, 32)
    scale = float(cpu.abs().max())
    return {"flow_field_cuda_vs_cpu_rel_err": float((gpu.cpu() - cpu).abs().max()) / scale,
            "flow_field_autocast_rel_err": float((gpu_autocast - gpu).abs().max()) / scale,
            "flow_field_dtype_under_autocast": str(gpu_autocast.dtype)}


def main() -> None:
    if not torch.cuda.is_available():
        print(json.dumps({"skipped": "no CUDA device"}))
        return
    torch.manual_seed(0)
    cpu = MARGenerator((1, 8, 8), 10, 1.3, width=64, encoder_depth=2, decoder_depth=2, head_width=64,
                       num_iter=4, num_sampling_steps=10, cfg=3.0)
    gpu = MARGenerator((1, 8, 8), 10, 1.3, width=64, encoder_depth=2, decoder_depth=2, head_width=64,
                       num_iter=4, num_sampling_steps=10, cfg=3.0).cuda()
    gpu.load_state_dict(cpu.state_dict())
    labels = torch.arange(10)
    x = torch.randn(10, 1, 8, 8)
    report = {"device": torch.cuda.get_device_name()}
    g = lambda dev: torch.Generator(dev).manual_seed(7)
    a = gpu.generate(labels.cuda(), generator=g("cuda"))
    b = gpu.generate(labels.cuda(), generator=g("cuda"))
    report["seeded_generate_identical"] = bool(torch.equal(a, b))
    report["generate_on_cuda"] = a.device.type == "cuda"
    cpu.eval(), gpu.eval()
    tokens, mask = torch.randn(4, 16, 4), torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :10] = True
    z_cpu = cpu.mar(tokens, mask, labels[:4])
    z_gpu = gpu.mar(tokens.cuda(), mask.cuda(), labels[:4].cuda()).cpu()
    report["conditions_cpu_cuda_max_abs_diff"] = float((z_cpu - z_gpu).abs().max())
    gpu.train()
    opt = torch.optim.AdamW(gpu.parameters(), lr=1e-3)
    losses = []
    for step in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = gpu.diffusion_loss(x.cuda(), labels.cuda(), torch.Generator("cuda").manual_seed(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    report["bf16_losses_finite"] = all(torch.isfinite(torch.tensor(losses)).tolist())
    report["bf16_loss_first_last"] = [losses[0], losses[-1]]
    report.update(_refinement_check(gpu))
    report.update(_flow_field_check())
    ok = report["seeded_generate_identical"] and report["generate_on_cuda"] and report["bf16_losses_finite"]
    ok = ok and report["refined_generate_on_cuda"] and report["flow_lowers_own_divergence"]
    ok = ok and report["flow_field_cuda_vs_cpu_rel_err"] < 1e-4 and report["flow_field_autocast_rel_err"] == 0.0
    ok = ok and report["conditions_cpu_cuda_max_abs_diff"] < 1e-3
    report["ok"] = ok
    print(json.dumps(report, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
