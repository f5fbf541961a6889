"""The layers of the gbalance package: who may import whom (README, "Architecture").

Every module's imports are read from its source (``ast``, nothing is
imported), each imported gbalance module is mapped to its layer, and a
module that imports a layer its own may not use fails the test.  The rule
table below is the one the subpackages' docstrings state ("May import:"),
and the last tests hold the docstrings to it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import ROOT

PKG = ROOT / "gbalance"

#: The layer of each top-level module; a module in a subpackage is in the
#: layer named after its subpackage.
TOP_LEVEL = {
    "__init__": "base", "errors": "base", "log": "base", "clock": "base", "build": "base",
    "config": "config", "arguments": "config",
    "wiring": "wiring",
    "cli": "entry", "__main__": "entry",
}

BASE = {"base"}
#: What each layer may import besides itself.  Lower layers never import
#: higher ones; the standard library and gevent are not layers.
MAY_IMPORT: dict[str, set[str]] = {
    "base": set(),
    "system": BASE,
    "table": {"system"} | BASE,
    "proxy": {"table", "system"} | BASE,
    "monitor": {"table", "system"} | BASE,
    "config": {"proxy", "monitor", "table", "system"} | BASE,
    "wiring": {"config", "proxy", "monitor", "table", "system"} | BASE,
    "process": {"wiring", "config", "proxy", "monitor", "table", "system"} | BASE,
    "shell": {"config", "table", "system"} | BASE,
    "entry": {"process", "shell", "wiring", "config", "proxy", "monitor", "table", "system"} | BASE,
    "service": {"entry", "shell", "config", "table", "system"} | BASE,
}
SUBPACKAGES = sorted(layer for layer in MAY_IMPORT if (PKG / layer / "__init__.py").exists())

#: Modules that may import gbalance modules inside a function, and why.
LAZY_OK = {
    # ``balance -c``/``-i`` must not import gevent and the proxy; a master must not import the shell.
    "gbalance.cli",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> str:
    """The layer of module (or package) ``name``; KeyError for one the table does not know."""
    parts = name.split(".")
    assert parts[0] == "gbalance", name
    if len(parts) == 1:
        return "base"
    if (PKG / parts[1] / "__init__.py").exists():
        return parts[1]
    return TOP_LEVEL[parts[1]]


def imported(tree: ast.Module, name: str, is_package: bool) -> list[tuple[int, str, bool]]:
    """(line, imported gbalance module, inside a function) for every import in ``tree``."""
    found = []
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        lazy = id(node) in nested
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, lazy) for a in node.names if a.name.split(".")[0] == "gbalance"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:        # relative: resolve against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != "gbalance":
                continue
            for alias in node.names:   # "from gbalance.proxy import forward" imports a module
                sub = f"{source}.{alias.name}"
                is_module = (PKG.parent / (sub.replace(".", "/") + ".py")).exists() or \
                    (PKG.parent / sub.replace(".", "/") / "__init__.py").exists()
                found.append((node.lineno, sub if is_module else source, lazy))
    return sorted(found)


def all_modules() -> list[Path]:
    return sorted(PKG.rglob("*.py"))


def test_every_module_has_a_layer():
    unknown = []
    for path in all_modules():
        try:
            layer_of(module_name(path))
        except KeyError:
            unknown.append(module_name(path))
    assert unknown == [], f"modules in no layer (add them to TOP_LEVEL or a subpackage): {unknown}"


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: module_name(p))
def test_module_imports_only_the_layers_it_may(path):
    name = module_name(path)
    layer = layer_of(name)
    tree = ast.parse(path.read_text(), str(path))
    bad, lazy = [], []
    for line, target, inside in imported(tree, name, path.name == "__init__.py"):
        other = layer_of(target)
        if other != layer and other not in MAY_IMPORT[layer]:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {name} ({layer}) imports {target} ({other})")
        if inside and name not in LAZY_OK:
            lazy.append(f"{path.relative_to(ROOT)}:{line}: {target} imported inside a function")
    assert bad == []
    assert lazy == []


def test_the_rule_table_is_acyclic():
    """A layer never reaches itself again through the layers it may import."""
    def reach(layer: str, seen: tuple[str, ...]) -> None:
        for other in MAY_IMPORT[layer]:
            assert other not in seen, " -> ".join((*seen, other))
            reach(other, (*seen, other))
    for layer in MAY_IMPORT:
        reach(layer, (layer,))


def test_the_checker_sees_a_forbidden_import(tmp_path):
    """The walk finds module-level, function-level and relative imports."""
    tree = ast.parse("from gbalance.proxy import server\n"
                     "def f():\n    import gbalance.process.master\n"
                     "from ..shell import render\n")
    found = imported(tree, "gbalance.table.state", False)
    assert found == [(1, "gbalance.proxy.server", False), (3, "gbalance.process.master", True),
                     (4, "gbalance.shell.render", False)]
    assert [layer_of(t) for _, t, _ in found] == ["proxy", "process", "shell"]
    assert not {"proxy", "process", "shell"} & MAY_IMPORT["table"]


#: How a docstring names a layer in its "May import:" sentence.
DOC_NAMES = {"``gbalance.errors``": "base", "``gbalance.log``": "base", "``gbalance.clock``": "base",
             "``gbalance.config``": "config", "``gbalance.arguments``": "config",
             "``gbalance.wiring``": "wiring", "``gbalance.cli``": "entry"}


@pytest.mark.parametrize("layer", SUBPACKAGES)
def test_subpackage_docstring_states_its_rule(layer):
    doc = ast.get_docstring(ast.parse((PKG / layer / "__init__.py").read_text())) or ""
    assert re.search(r"^Owns: ", doc, re.M), f"gbalance/{layer}/__init__.py: no 'Owns:' paragraph"
    m = re.search(r"^May import: (.*?)(?:\.\s|\.$|;)", doc, re.M | re.S)
    assert m, f"gbalance/{layer}/__init__.py: no 'May import:' sentence"
    sentence = " ".join(m.group(1).split())
    named = {layer for phrase, layer in (("base modules", "base"), ("config layer", "config"))
             if phrase in sentence}
    for token in re.findall(r"``[\w.]+``", sentence):
        named.add(DOC_NAMES.get(token, token.strip("`")))
    assert named - {layer} == MAY_IMPORT[layer], sentence


def test_readme_lists_every_module_once():
    """README, "Architecture": one line per module, and no module that is gone."""
    text = (ROOT / "README").read_text()
    section = text[text.index("\nArchitecture\n"):]
    listed = re.findall(r"^    (gbalance/[\w/]+\.py) ", section, re.M)
    modules = sorted(str(p.relative_to(ROOT)) for p in all_modules()
                     if p.name not in ("__init__.py", "__main__.py"))
    assert sorted(listed) == modules
