"""Check the invariance toolkit on an accelerator: Grams built on the device against CPU float64 Grams.

The analysis builds every Gram matrix X X^T on the model's device (in float64) and moves only the n x n result to
the CPU. This script, self-contained and offline (a randomly initialised ViT-B/16 built from its config, random
images), prints:

1. the largest difference between device Grams and CPU float64 Grams of the *same* features, per layer (must be
   float64 rounding: the script exits with status 1 above ``--tolerance``, relative to the Gram's largest entry);
2. how far the noise floor CKA(M_l(X), M_l(noise)) moves between the model on the device and a CPU copy
   (includes the forward pass's own kernel differences, e.g. TF32 convolutions);
3. the same for a bf16 copy of the model on the device (features are promoted to float32 before the Gram);
4. the time of one Gram at ViT-B/16 scale (n = ``--gram-n`` images, 197 tokens x 768 features) on the device
   and on the CPU.

    python examples/check_analysis_gpu.py                 # CUDA, ViT-B/16 geometry
    python examples/check_analysis_gpu.py --device cpu --small   # smoke test without an accelerator
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from transformers import ViTConfig, ViTModel

import peft_ssf_analysis  # the toolkit alone: no SSF registration, PEFT stays as it is


def build_model(small: bool) -> ViTModel:
    torch.manual_seed(0)
    if small:
        config = ViTConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                           image_size=32, patch_size=4)  # fmt: skip
    else:
        config = ViTConfig()  # ViT-B/16: 12 blocks, hidden 768, 224 px, patch 16
    return ViTModel(config, add_pooling_layer=False).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_grams(an, model, images, device, layers, tolerance: float) -> bool:
    """Device Gram vs CPU float64 Gram of the same device features."""
    norm = an.Normalization((0.5,), (0.5,), "check")
    feats = an.layer_representations(model, norm(images.to(device)), layers, on_model_device=True)
    ok = True
    print("1. device Gram vs CPU float64 Gram of the same features (max |diff| / max |G|):")
    for name, f in feats.items():
        on_device = an.gram_linear(f)
        cpu = f.detach().cpu().double()
        reference = cpu @ cpu.T
        rel = float((on_device - reference).abs().max() / reference.abs().max())
        cka = an.cka_from_grams(on_device, reference)
        ok &= rel <= tolerance
        print(f"   {name:>8}: features {tuple(f.shape)} {f.dtype} on {f.device}; rel diff {rel:.2e}; CKA {cka:.15f}")
    return ok


def floors(an, model, images, layers, norm) -> list[float]:
    values = an.noise_baseline(model, images, layers, normalization=norm, batch_size=16)
    return list(values.values())


def check_floors(an, model, images, device, layers) -> None:
    norm = an.Normalization((0.5,), (0.5,), "check")
    on_device = floors(an, model.to(device), images, layers, norm)
    on_cpu = floors(an, model.to("cpu"), images, layers, norm)
    half = floors(an, model.to(device).to(torch.bfloat16), images, layers, norm)
    model.float()
    diff_cpu = max(abs(a - b) for a, b in zip(on_device, on_cpu))
    diff_bf16 = max(abs(a - b) for a, b in zip(on_device, half))
    print("2. noise floor CKA(M_l(X), M_l(noise)) per layer, model on the device: " + fmt(on_device))
    print(f"   same model on the CPU: max |diff| {diff_cpu:.2e} (forward-pass kernels included)")
    print("3. bf16 copy on the device: " + fmt(half) + f"; max |diff| to float32 {diff_bf16:.2e}")


def fmt(values: list[float]) -> str:
    return ", ".join("nan" if math.isnan(v) else f"{v:.4f}" for v in values)


def time_gram(an, n: int, p: int, device: torch.device) -> None:
    x = torch.randn(n, p, generator=torch.Generator().manual_seed(0))
    timings = {}
    for where in dict.fromkeys([device, torch.device("cpu")]):
        xd = x.to(where)
        an.gram_linear(xd[:8])  # warm-up
        sync(where)
        start = time.perf_counter()
        gram = an.gram_linear(xd)
        sync(where)
        timings[str(where)] = (time.perf_counter() - start, gram)
    text = ", ".join(f"{k} {t:.3f} s" for k, (t, _) in timings.items())
    grams = [g for _, g in timings.values()]
    rel = float((grams[0] - grams[-1]).abs().max() / grams[-1].abs().max())
    print(f"4. one Gram of {n} x {p} float32 features ({2 * n * n * p / 1e9:.1f} GFLOP in float64): {text}; "
          f"rel diff {rel:.2e}")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="device to check (default cuda)")
    parser.add_argument("--n", type=int, default=64, help="images for checks 1-3")
    parser.add_argument("--gram-n", type=int, default=500, help="images of the timed Gram (paper: 500)")
    parser.add_argument("--small", action="store_true", help="a tiny ViT instead of ViT-B/16 (smoke test)")
    parser.add_argument("--tolerance", type=float, default=1e-10, help="largest accepted relative Gram difference")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu for a smoke test")
        return 2
    an = peft_ssf_analysis
    model = build_model(args.small).to(device)
    size = model.config.image_size
    images = torch.rand(args.n, 3, size, size, generator=torch.Generator().manual_seed(1))
    layers = an.layer_names(model)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {device} ({name}); torch {torch.__version__}; {len(layers)} layers; n={args.n}, {size} px")
    ok = check_grams(an, model, images, device, layers, args.tolerance)
    check_floors(an, model, images, device, layers)
    tokens = (size // model.config.patch_size) ** 2 + 1
    time_gram(an, args.gram_n, tokens * model.config.hidden_size, device)
    print("OK" if ok else f"FAILED: a device Gram differs from the CPU float64 Gram by more than {args.tolerance:g}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
