"""The package-level import graph of components/ and pipelines/, as a Mermaid block.

    python docs/import_graph.py            # print the block
    python docs/import_graph.py --write    # put it in docs/layout.md (between its markers)
    python docs/import_graph.py --root DIR # the graph of another checkout (e.g. an old commit)

A node is a package of components/ (`data/`, `training/`, ...), a top-level module of
components/ (`cluster.py`, ...), `pipelines/steps/`, or the rest of pipelines/. An arrow
`a --> b` says that some module of `a` imports one of `b`, at its top or inside a function.
Standard library only: it reads the source's syntax trees and imports nothing of it.
`tests/policy/test_codebase.py` holds docs/layout.md to this script's output.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "docs" / "layout.md"
BEGIN = "<!-- import graph: python docs/import_graph.py --write -->"
END = "<!-- end of the import graph -->"


def node_of(module: str, root: Path) -> str | None:
    """'components.training.worker' -> 'components/training/'; 'components.cluster' ->
    'components/cluster.py'; 'pipelines.steps.tune' -> 'pipelines/steps/'; any other
    module of pipelines -> 'pipelines/'. None: not one of this project's."""
    parts = module.split(".")
    if parts[0] == "pipelines":
        return "pipelines/steps/" if parts[1:2] == ["steps"] else "pipelines/"
    if parts[0] != "components" or len(parts) == 1:
        return None
    if (root / "components" / parts[1]).is_dir():
        return f"components/{parts[1]}/"
    if (root / "components" / f"{parts[1]}.py").is_file():
        return f"components/{parts[1]}.py"
    return None


def _imported(tree: ast.Module) -> set[str]:
    """Every project module a module imports, anywhere in it (`from components import x`
    counts as `components.x`)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            if node.module in ("components", "pipelines"):
                out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def graph(root: Path) -> dict[str, set[str]]:
    """{node: the nodes it imports}, every node of the code included."""
    edges: dict[str, set[str]] = {}
    for path in sorted([*root.glob("components/**/*.py"), *root.glob("pipelines/**/*.py")]):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        source = node_of(module.removesuffix(".__init__"), root)
        if source is None:
            continue
        targets = {node_of(m, root) for m in _imported(ast.parse(path.read_text()))}
        edges.setdefault(source, set()).update(t for t in targets if t and t != source)
    return edges


def _id(node: str) -> str:
    """'components/data/' -> 'data', 'components/cluster.py' -> 'cluster', 'pipelines/steps/'
    -> 'pipelines_steps'."""
    return node.removeprefix("components/").rstrip("/").replace("/", "_").removesuffix(".py")


def mermaid(edges: dict[str, set[str]]) -> str:
    """One line per node (its label), then one line per importing node: `a --> b & c`."""
    lines = ["```mermaid", "flowchart LR"]
    lines += [f'    {_id(n)}["{n}"]' for n in sorted(edges)]
    lines += [f"    {_id(n)} --> {' & '.join(_id(t) for t in sorted(edges[n]))}"
              for n in sorted(edges) if edges[n]]
    lines.append("```")
    return "\n".join(lines) + "\n"


def write(block: str, page: Path = LAYOUT) -> bool:
    """Replace the block between the page's markers; True when the page changed."""
    text = page.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{block}{END}{tail}"
    if new != text:
        page.write_text(new)
    return new != text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT, help="the checkout to draw")
    ap.add_argument("--write", action="store_true", help=f"update {LAYOUT.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    block = mermaid(graph(args.root.resolve()))
    if args.write:
        print(f"{LAYOUT.relative_to(ROOT)}: "
              f"{'updated' if write(block) else 'already up to date'}")
    else:
        sys.stdout.write(block)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
