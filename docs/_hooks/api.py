"""MkDocs hook: expands the `<!-- api -->` marker in api.md into one mkdocstrings block per public module.

The modules are every public module of the package (no leading underscore; not the demo program), in
the order below (others after them, alphabetically), then the integrations. Each block renders what that module's `__all__`
lists, minus names it only re-exports from another module, so every object appears once, under the
module that defines it. The package is read with `ast`, never imported.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PKG = ROOT / "rpg"
ORDER = [
    "losses",
    "presets",
    "functional",
    "config",
    "kl",
    "objectives",
    "clipping",
    "aggregation",
    "advantages",
    "correction",
    "metrics",
    "reference",
    "logprobs",
    "fused",
    "testing",
]
INTEGRATIONS = ["integrations.verl", "integrations.trl"]
NOT_API = {"demo", "integrations"}  # a program, and a package documented module by module


def _source(module: str) -> pathlib.Path | None:
    path = PKG.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _exports(tree: ast.Module) -> list[str] | None:
    """The literal ``__all__``, extended by any later literal ``__all__ += [...]`` (a module may add a block)."""
    exported = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            try:
                exported = list(ast.literal_eval(node.value))
            except ValueError:
                return None
        elif isinstance(node, ast.AugAssign) and getattr(node.target, "id", None) == "__all__" and exported is not None:
            try:
                exported += list(ast.literal_eval(node.value))
            except ValueError:
                return None
    return exported


def _members(module: str) -> list[str] | None:
    """`__all__` minus the names imported from elsewhere (None: no literal `__all__`, use the filters)."""
    tree = ast.parse(_source(module).read_text())
    exported = _exports(tree)
    if exported is None:
        return None
    imported = {
        alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    return [name for name in exported if name not in imported]


def api_modules() -> list[str]:
    names = {p.stem for p in PKG.glob("*.py")} | {p.parent.name for p in PKG.glob("*/__init__.py")}
    modules = [n for n in names if not n.startswith("_") and n not in NOT_API]
    ordered = [m for m in ORDER if m in modules] + sorted(m for m in modules if m not in ORDER)
    integrations = sorted(
        f"integrations.{p.stem}" for p in (PKG / "integrations").glob("*.py") if not p.stem.startswith("_")
    )
    return ordered + [m for m in INTEGRATIONS if m in integrations] + [m for m in integrations if m not in INTEGRATIONS]


def _block(module: str) -> str:
    members = _members(module)
    lines = [f"::: rpg.{module}"]
    if members is not None:
        lines += ["    options:", "      members:"] + [f"        - {name}" for name in members]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- api -->" not in markdown:
        return markdown
    return markdown.replace("<!-- api -->", "\n\n".join(_block(m) for m in api_modules()))
