"""The dict keys SGLang writes into a /generate response (read by sglang_source.py): the top level,
meta_info (from every module that writes it), and finish_reason."""

from __future__ import annotations

import ast

from sglang_ast import add_dict_keys, const_str, is_meta_info, sglang_imports
from sglang_source import DETOKENIZER_MANAGER, SCHEDULE_BATCH, TOKENIZER_MANAGER, SglangSource, where


def meta_info_sources(src: SglangSource) -> list[str]:
    """tokenizer_manager.py (which builds meta_info), the sglang modules it imports that touch
    meta_info (e.g. weight-version and time-stats helpers), and detokenizer_manager.py."""
    files = [TOKENIZER_MANAGER]
    for module in set(sglang_imports(src, TOKENIZER_MANAGER).values()):
        file = src.module_file(module)
        if file is not None and file not in files and "meta_info" in src.read(file):
            files.append(file)
    if src.has(DETOKENIZER_MANAGER):
        files.append(DETOKENIZER_MANAGER)
    return files


def meta_info_keys(src: SglangSource) -> dict[str, str]:
    """Keys written into a meta_info dict anywhere in `meta_info_sources`: `meta_info = {...}`,
    `meta_info["k"] = v`, `meta_info.update({...})` / `.update(k=v)` / `.setdefault("k", ...)`,
    `out["meta_info"]["k"] = v`, and dict literals in functions whose name says they build
    meta_info (e.g. `convert_to_output_meta_info`)."""
    keys: dict[str, str] = {}
    for path in meta_info_sources(src):
        tree = src.tree(path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and "meta_info" in node.name:
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Dict):
                        add_dict_keys(keys, inner, path)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if is_meta_info(target) and isinstance(node.value, ast.Dict):
                        add_dict_keys(keys, node.value, path)
                    if isinstance(target, ast.Subscript) and is_meta_info(target.value):
                        if (k := const_str(target.slice)) is not None:
                            keys.setdefault(k, where(path, target))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if not is_meta_info(node.func.value):
                    continue
                if node.func.attr == "update":
                    for arg in node.args:
                        if isinstance(arg, ast.Dict):
                            add_dict_keys(keys, arg, path)
                    for kw in node.keywords:
                        if kw.arg is not None:
                            keys.setdefault(kw.arg, where(path, kw))
                elif node.func.attr == "setdefault" and node.args:
                    if (k := const_str(node.args[0])) is not None:
                        keys.setdefault(k, where(path, node))
    return keys


def generate_top_level_keys(src: SglangSource) -> dict[str, str]:
    """Keys of the dicts tokenizer_manager.py returns as a generate result (those that carry a
    "meta_info" key), plus keys stored into such an output dict: `out["text"] = ...`."""
    keys: dict[str, str] = {}
    tree = src.tree(TOKENIZER_MANAGER)
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and "meta_info" in {const_str(k) for k in node.keys}:
            add_dict_keys(keys, node, TOKENIZER_MANAGER)
    return keys


def finish_reason_keys(src: SglangSource) -> tuple[dict[str, str], set[str]]:
    """(keys, values of "type") of the dicts every `to_json` in schedule_batch.py returns: what
    meta_info["finish_reason"] holds."""
    keys: dict[str, str] = {}
    types: set[str] = set()
    for node in ast.walk(src.tree(SCHEDULE_BATCH)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "to_json":
            for inner in ast.walk(node):
                if isinstance(inner, ast.Dict):
                    add_dict_keys(keys, inner, SCHEDULE_BATCH)
                    for k, v in zip(inner.keys, inner.values):
                        if const_str(k) == "type" and (t := const_str(v)) is not None:
                            types.add(t)
    return keys, types
