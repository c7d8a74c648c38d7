"""
The package's layout: no import cycle between d2kd's subpackages (module-level or inside
functions), the layering the design asks for, and nothing in the installed package that
knows where the repository is.
"""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "d2kd")


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                yield path, relative[: -len(".__init__")] if relative.endswith(".__init__") else relative


def _imported_d2kd_modules(path, module):
    """Every d2kd module ``path`` imports, anywhere in the file (functions included)."""
    is_package = path.endswith("__init__.py")
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if alias.name.startswith("d2kd")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("d2kd"):
                found.append(target)
    return found


def _subpackage(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def subpackage_edges():
    edges = {}
    for path, module in _modules():
        source = _subpackage(module)
        if source is None:
            continue  # d2kd/__init__.py assembles the public API from every subpackage
        for target in map(_subpackage, _imported_d2kd_modules(path, module)):
            if target and target != source:
                edges.setdefault((source, target), []).append(module)
    return edges


def _find_cycle(edges):
    graph = {}
    for source, target in edges:
        graph.setdefault(source, set()).add(target)
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return trail + [node, nxt]
            if nxt not in state:
                cycle = visit(nxt, trail + [node])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_the_scan_sees_known_edges():
    """The scanner is not blind: edges that must exist (heads use modeling; the trainer builds heads)."""
    edges = subpackage_edges()
    assert ("heads", "modeling") in edges and ("engine", "heads") in edges and ("modeling", "config") in edges
    assert _find_cycle({("a", "b"): [], ("b", "c"): [], ("c", "a"): []}) == ["a", "b", "c", "a"]


def test_no_import_cycle_between_subpackages():
    edges = subpackage_edges()
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle " + " -> ".join(cycle) + ": " + str(
        {pair: edges[pair] for pair in zip(cycle, cycle[1:])}
    )


@pytest.mark.parametrize(
    "source,forbidden",
    [
        ("heads", "engine"),  # heads never import the engine
        ("config", "heads"),  # config never imports heads ...
        ("config", "modeling"),  # ... or backbones
        ("modeling", "heads"),  # the step's types live in d2kd.step
        ("losses", "heads"),
        ("step", "heads"),
    ],
)
def test_layering(source, forbidden):
    assert (source, forbidden) not in subpackage_edges(), subpackage_edges().get((source, forbidden))


def test_method_entry_points_keep_their_names():
    """``from d2kd.heads.<method> import <Head>`` works for single-file methods and packages alike."""
    from d2kd.heads import DISTILL_HEAD_REGISTRY
    from d2kd.heads.chen2017 import Chen2017
    from d2kd.heads.fbkd import FBKD
    from d2kd.heads.fgd import FGD
    from d2kd.heads.fgfi import FGFI
    from d2kd.heads.gkd import GKD
    from d2kd.heads.hgd import HGD

    for head in (Chen2017, FBKD, FGD, FGFI, GKD, HGD):
        assert DISTILL_HEAD_REGISTRY.get(head.__name__) is head


def test_the_package_does_not_know_the_repository():
    """No path climbs out of the package to the checkout, and no repository folder is hard-wired."""
    offenders = []
    for path, module in _modules():
        text = open(path).read()
        code = ast.unparse(ast.parse(text))  # drops comments; docstrings may mention configs
        for marker in ("dirname(os.path.dirname(os.path.dirname", "REPO_ROOT", "'configs/", "'benchmarks/"):
            if marker in code:
                offenders.append((module, marker))
    assert not offenders, offenders


def test_config_options_of_heads_come_from_registration():
    """Registering a head adds its options to every config built afterwards, without config importing heads."""
    from detectron2.config import CfgNode as CN

    from d2kd.config import get_distill_cfg
    from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead

    class LayoutProbeHead(DistillHead):
        @classmethod
        def add_config(cls, cfg):
            cfg.DISTILL.LAYOUTPROBEHEAD = CN({"WEIGHT": 3.0})

    assert "LAYOUTPROBEHEAD" not in get_distill_cfg().DISTILL
    DISTILL_HEAD_REGISTRY.register(LayoutProbeHead)
    try:
        assert get_distill_cfg().DISTILL.LAYOUTPROBEHEAD.WEIGHT == 3.0
    finally:
        DISTILL_HEAD_REGISTRY._obj_map.pop("LayoutProbeHead")
        from d2kd.config import defaults

        defaults._CONFIG_EXTENSIONS.remove(LayoutProbeHead.add_config)


REPO = os.path.dirname(PACKAGE)


def _repository_text_files():
    for top in ("d2kd", "configs", "docs", "tests", "tools", "benchmarks"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for name in files:
                if name.endswith((".py", ".md", ".yaml", ".cfg")) and "results" not in folder:
                    yield os.path.join(folder, name)
    for name in ("README.md", "train_net.py", "setup.cfg", "Makefile"):
        yield os.path.join(REPO, name)


def test_no_citation_of_documents_outside_the_repository():
    import re

    pattern = re.compile(r"(?<![\w/])methods\.md|[Dd]esign lessons? \d|\b[Ii]ssue #?\d+")
    this_file = os.path.abspath(__file__)
    hits = []
    for path in _repository_text_files():
        if os.path.abspath(path) == this_file:
            continue
        for number, line in enumerate(open(path, encoding="utf-8"), 1):
            if pattern.search(line):
                hits.append(f"{os.path.relpath(path, REPO)}:{number}: {line.strip()[:100]}")
    assert not hits, "\n".join(hits)


def test_readme_is_short_and_its_method_documents_exist():
    import re

    readme = os.path.join(REPO, "README.md")
    assert os.path.getsize(readme) <= 15000
    links = re.findall(r"\]\((docs/[^)#]+)", open(readme, encoding="utf-8").read())
    assert any(link.startswith("docs/methods/") for link in links)
    missing = [link for link in links if not os.path.exists(os.path.join(REPO, link))]
    assert not missing, missing
    heads = {"chen2017", "fitnet", "kd", "fgfi", "defeat", "fgd", "cwd", "fbkd", "gkd", "hgd", "dense_kd", "inherit"}
    assert heads <= {name[:-3] for name in os.listdir(os.path.join(REPO, "docs", "methods"))}
