"""One ONNX Runtime session for a whole path: its modules' graphs joined into one model.

Why: a path runs as a chain of sessions, one per module, so that tasks share modules and a mixed
batch runs a shared prefix once (`runtime.run_grouped`). A batch of one path pays for that with a
`run()` call, an NCHW <-> NCHWc layout round trip and a separate working set per module: on the
ImageNet MobileNetV2 at 96 px one image takes ~1.9 ms through the 20 sessions and ~1.6 ms through
one joined session. So a path also gets a joined session, used for batches of that path alone
up to `merged_max_batch` images; larger and mixed batches keep the chain.

Answers must not depend on which of the two ran a request: a version's answers are reproducible
bit for bit, and a request's company in a batch must not change them. Joined naively they differ
(by ~4e-6): ONNX Runtime then fuses the residual Add of one block into the last Conv of the block
before (NCHWc "sum" fusion), which accumulates in another order than the chain, where the Add sees
its input as a graph input. A Reshape to the same shape at each boundary is a barrier ORT's
optimizers do not cross, so each module is optimised as it is alone; and the joined session is used
only after it gave the chain's outputs bit for bit on the warm-up batches (`Runtime.prepare`).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from munet.models.export import INPUT, OUTPUT


class NotJoinable(ValueError):
    """The modules' graphs cannot be joined into one (the path keeps its chain)."""


def join_modules(models: list[onnx.ModelProto]) -> bytes:
    """The modules `x -> y` in order as one model `x -> y`, with a same-shape Reshape between two."""
    if len(models) < 2:
        raise NotJoinable("a path of one module is already one session")
    opsets: dict[str, int] = {}
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    infos: list[onnx.ValueInfoProto] = []
    graph_in = graph_out = None
    carried = INPUT  # the name the next module's input is renamed to
    for i, model in enumerate(models):
        if model.functions:
            raise NotJoinable(f"module {i} defines ONNX functions")
        for op in model.opset_import:
            if opsets.setdefault(op.domain, op.version) != op.version:
                raise NotJoinable(f"module {i} imports opset {op.version} of {op.domain!r}, another module "
                                  f"{opsets[op.domain]}")
        g = model.graph
        init_names = {t.name for t in g.initializer}
        inputs = [v for v in g.input if v.name not in init_names]
        if len(inputs) != 1 or len(g.output) != 1:
            raise NotJoinable(f"module {i} has {len(inputs)} inputs and {len(g.output)} outputs, not one each")
        last = i == len(models) - 1
        out_rank = len(g.output[0].type.tensor_type.shape.dim)
        if not last and out_rank == 0:
            raise NotJoinable(f"module {i} does not declare its output's rank")
        names = {inputs[0].name: carried}
        inner_out = OUTPUT if last else f"m{i}/{g.output[0].name}"
        names[g.output[0].name] = inner_out

        def rename(name: str, i: int = i, names: dict = names) -> str:
            return name if not name else names.get(name, f"m{i}/{name}")

        for n in g.node:
            if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
                raise NotJoinable(f"module {i} has control flow ({n.op_type})")
            m = onnx.NodeProto()
            m.CopyFrom(n)
            m.name = f"m{i}/{n.name}"
            m.input[:] = [rename(s) for s in n.input]
            m.output[:] = [rename(s) for s in n.output]
            nodes.append(m)
        for t in g.initializer:
            c = onnx.TensorProto()
            c.CopyFrom(t)
            c.name = rename(t.name)
            inits.append(c)
        for v in g.value_info:
            infos.append(_renamed_info(v, rename(v.name), i))
        if i == 0:
            graph_in = _renamed_info(inputs[0], INPUT, i)
        if last:
            graph_out = _renamed_info(g.output[0], OUTPUT, i)
        else:
            shape = f"m{i}/barrier_shape"
            carried = f"m{i}/barrier"
            # zeros: "copy this dimension" (allowzero=0), so the Reshape is the identity for any shape
            inits.append(numpy_helper.from_array(np.zeros(out_rank, np.int64), shape))
            nodes.append(helper.make_node("Reshape", [inner_out, shape], [carried], name=f"m{i}/barrier"))
    graph = helper.make_graph(nodes, "munet_path", [graph_in], [graph_out], initializer=inits, value_info=infos)
    joined = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets.items()],
                               producer_name="munet")
    joined.ir_version = max(m.ir_version for m in models)
    return joined.SerializeToString()


def _renamed_info(v: onnx.ValueInfoProto, name: str, i: int) -> onnx.ValueInfoProto:
    """`v` under `name`, its symbolic dimensions made the module's own: two modules' "height" are
    different sizes, and ORT plans buffers as if equal names were equal sizes. "batch" is the one
    dimension every module shares."""
    c = onnx.ValueInfoProto()
    c.CopyFrom(v)
    c.name = name
    for d in c.type.tensor_type.shape.dim:
        if d.dim_param and d.dim_param != "batch":
            d.dim_param = f"m{i}/{d.dim_param}"
    return c
