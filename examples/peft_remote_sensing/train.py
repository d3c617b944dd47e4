"""LoRA on a frozen timm backbone for remote-sensing scene classification, on a schedule.

    python examples/peft_remote_sensing/train.py                  # CPU, synthetic scenes
    python examples/peft_remote_sensing/train.py --data-dir DIR --pretrained --device cuda

The recipe (README.md beside this file): a timm ViT whose base weights peft freezes,
LoRA (rank 8) on every attention ``qkv`` and a trainable classifier; freezesched pins the
base (dropout, DropPath and any BatchNorm), warms the adapters up with the whole base
frozen, then trains the top two blocks every ρ-th epoch (DBF), and accounts what the run
cost with the paper's Eq. 1. Without ``--data-dir`` the data are synthetic "scenes":
oriented textures with a per-class spectral signature over four bands, so the script runs
anywhere in about a minute; nothing is downloaded unless ``--pretrained`` is given.
"""

from __future__ import annotations

import argparse
import math
import warnings

import peft
import timm
import torch
from torch import nn

from freezesched import Constant, FreezeController, Sequential, Step
from freezesched.integrations.peft import PeftAdapters, make_trainable
from freezesched.integrations.timm import timm_stages
from freezesched.profiling import FlopAccountant, FrozenMiddleWarning, render_runs


def synthetic_scenes(n: int, size: int, bands: int, classes: int, seed: int):
    """Oriented stripes (class-dependent angle and frequency) plus a spectral signature."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    angle = y.float()[:, None, None] * math.pi / classes
    freq = 4 + 2 * (y % 3).float()[:, None, None]
    stripes = torch.sin(freq * math.pi * (xx * torch.cos(angle) + yy * torch.sin(angle)))
    signature = torch.rand(classes, bands, generator=g)[y][:, :, None, None]
    noise = 0.5 * torch.randn(n, bands, size, size, generator=g)
    return stripes[:, None] * signature + noise, y


def image_folder(root: str, size: int):
    """A real dataset as ``root/<class>/<image>`` (EuroSAT RGB, UC Merced, ...)."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()])
    return datasets.ImageFolder(root, transform=tf)


def build(args: argparse.Namespace, classes: int) -> nn.Module:
    torch.manual_seed(0)
    kwargs = {"num_classes": classes, "in_chans": args.bands, "drop_path_rate": 0.1}
    if not args.pretrained:  # a small random ViT: the recipe, not the accuracy
        kwargs.update(img_size=args.size, patch_size=8, embed_dim=96, depth=6, num_heads=3)
    backbone = timm.create_model(args.model, pretrained=args.pretrained, **kwargs)
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["qkv"], modules_to_save=["head"])
    return peft.get_peft_model(backbone, config)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--pretrained", action="store_true", help="timm weights (downloads)")
    parser.add_argument("--data-dir", help="an ImageFolder of scenes; synthetic if absent")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--bands", type=int, default=4, help="input channels (synthetic data)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="epochs of adapters only")
    parser.add_argument("--rho", type=int, default=2, help="then the top blocks every rho-th")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    if args.data_dir:
        args.bands = 3
        train_set = image_folder(args.data_dir, args.size)
        classes = len(train_set.classes)
    else:
        classes = 5
        train_set = torch.utils.data.TensorDataset(
            *synthetic_scenes(96, args.size, args.bands, classes, seed=0)
        )
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
    model = build(args, classes).to(args.device)

    # Which part trains when: the base (stem and lower blocks) is frozen for the run,
    # which pins its dropout and DropPath; the adapters and the head (trainable exceptions)
    # train every epoch; the top two blocks, which peft froze, are made trainable and then
    # frozen by a DBF schedule: frozen during the warm-up, then trainable every rho-th epoch.
    stages = timm_stages(model, stem=True)  # peft froze cls_token and pos_embed: allowed
    lower, top = stages[:-2], stages[-2:]
    make_trainable(model, [name for stage in top for name in stage])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    dbf = Sequential([Constant(True), Step(args.rho)], [args.warmup])
    controller = FreezeController(
        model,
        {tuple(lower): Constant(True), tuple(top): dbf},
        trainable=[PeftAdapters()],
        optimizers=opt,
    )
    accountant = FlopAccountant(model)
    # LoRA sits in every block, so the frozen base must pass gradients back to the
    # adapters below it: the "frozen middle" the accountant warns about is the recipe here.
    warnings.filterwarnings("ignore", category=FrozenMiddleWarning)
    history = []
    with controller:
        for epoch in range(args.epochs):
            frozen = controller.apply(epoch)
            model.train()
            correct = seen = 0
            for x, y in loader:
                x, y = x.to(args.device), y.to(args.device)
                with accountant.step(batch_size=len(x)):
                    logits = model(x)
                    loss = nn.functional.cross_entropy(logits, y)
                    loss.backward()
                opt.step()
                opt.zero_grad()
                correct += int((logits.argmax(1) == y).sum())
                seen += len(y)
            top_frozen = frozen[top[-1][0]]
            history.append({"epoch": epoch, "top_frozen": top_frozen, "acc": correct / seen})
            print(f"epoch {epoch}  top blocks {'frozen   ' if top_frozen else 'trainable'}"
                  f"  loss {loss.item():.3f}  train acc {correct / seen:.2f}")  # fmt: skip
    run = accountant.totals("LoRA + DBF top blocks")
    print(render_runs([run]))
    return {"history": history, "run": run}


if __name__ == "__main__":
    main()
