"""Small AST helpers for reading the sglang source: literals, keywords, names, dict keys, imports."""

from __future__ import annotations

import ast

from sglang_source import SglangSource, where


def const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def const_str_list(node: ast.AST | None) -> list[str]:
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [s for e in node.elts if (s := const_str(e)) is not None]
    return []


def keyword(call: ast.Call | None, name: str) -> ast.expr | None:
    if call is None:
        return None
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def name_of(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def is_meta_info(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "meta_info" in node.id
    if isinstance(node, ast.Attribute):
        return "meta_info" in node.attr
    if isinstance(node, ast.Subscript):
        return const_str(node.slice) == "meta_info"
    return False


def add_dict_keys(keys: dict[str, str], node: ast.Dict, path: str) -> None:
    for key in node.keys:
        if (k := const_str(key)) is not None:
            keys.setdefault(k, where(path, key))


def defines_class(src: SglangSource, path: str, name: str) -> bool:
    return any(isinstance(n, ast.ClassDef) and n.name == name for n in src.tree(path).body)


def sglang_imports(src: SglangSource, path: str) -> dict[str, str]:
    """Names a module imports from sglang modules: {name: "sglang.x.y"} (top-level imports only)."""
    imported: dict[str, str] = {}
    for node in src.tree(path).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang") and node.level == 0:
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    return imported
