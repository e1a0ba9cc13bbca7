"""The trainer's package layout: no import cycle anywhere in vespo_trainer (module-level or inside a
function: a function-level import would only hide a cycle), and imports go one way, down the layers
that README's "Development" section draws. Static (the source's import statements), so it runs in
milliseconds and needs none of the heavy dependencies."""
from __future__ import annotations

import ast
import os

import pytest
from trainer_test_utils import TRAINER_SRC

PKG = os.path.join(TRAINER_SRC, "vespo_trainer")

# Lower layers never import higher ones; the modules of one role package (data, reward, rollout,
# learner, loops) may import each other, but no role package imports another of its layer.
LAYERS = [
    ["errors"],
    ["config"],
    ["runtime", "tokenizer", "checkpoint", "metrics_log", "batch", "weight_sync"],
    ["model", "data"],
    ["reward", "rollout", "learner", "hf_export", "plot"],
    ["cluster", "submit"],
    ["loops"],
    ["cli"],
    ["__main__"],
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _modules() -> dict:
    """{dotted module name: path} of every module of the package."""
    out = {}
    for root, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), TRAINER_SRC)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _edges(modules: dict) -> dict:
    """{module: {the package's modules it imports anywhere in its source}}."""
    edges = {}
    for name, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_pkg else name.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module
                for a in node.names:  # `from . import checkpoint` imports a module, `from .x import f` a name
                    targets.add(f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def _cycles(edges: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_planted_cycle():
    """The check can fail: a -> b -> c -> a is reported, a DAG is not."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_in_the_package():
    edges = _edges(_modules())
    assert len(edges) > 30 and edges["vespo_trainer.loops.run"], "the scan found the package's imports"
    assert _cycles(edges) == []


def _role(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_go_down_the_layers(module):
    if module == "vespo_trainer":
        return
    edges = _edges(_modules())
    role = _role(module)
    assert role in LAYER, f"{module}: not in any layer of LAYERS (add it where it belongs)"
    for target in sorted(edges[module]):
        if target == "vespo_trainer" or _role(target) == role:
            continue
        assert LAYER[_role(target)] < LAYER[role], \
            f"{module} imports {target}: layer {LAYER[_role(target)]} is not below {role}'s {LAYER[role]}"
