"""The root every method of `munet bench quality` starts from, loaded once, frozen, with the content ids
the server's store gives its modules (so the munet paths can be told apart from the root's)."""

from __future__ import annotations

from dataclasses import dataclass

from benchmarks.common import BenchError
from benchmarks.quality_settings import Settings


@dataclass
class Root:
    name: str
    modules: list  # first module, layers..., head (eval mode, frozen)
    info: dict
    ids: list[str]  # content ids, exactly as the server's store names them
    params: list[int]
    builtin: bool
    image_size: int

    @property
    def trunk_params(self) -> int:
        return sum(self.params[:-1])


def load_root_model(s: Settings) -> Root:
    from munet.config import Config
    from munet.models.modules import count_params, module_config
    from munet.models.roots import BUILTIN_ROOTS, RootUnavailable, get_root_spec, input_size
    from munet.models.store import content_id

    try:
        spec = get_root_spec(s.root, Config.from_env().home)
        modules, info = spec.load()
    except RootUnavailable as e:
        raise BenchError(str(e)) from None
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)
    ids = [content_id(m.kind, module_config(m), m) for m in modules]
    return Root(s.root, modules, info, ids, [count_params(m) for m in modules], s.root in BUILTIN_ROOTS,
                input_size(spec, s.image_size))
