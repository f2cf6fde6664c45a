"""What the sglang source declares (read by sglang_source.py): HTTP routes, the request models their
handlers take, the fields of its dataclasses and Structs, its generated JSON contract codec, and
the server's command-line flags."""

from __future__ import annotations

import ast
import re
import sys
import types
from dataclasses import dataclass

from sglang_ast import const_str, const_str_list, defines_class, keyword, name_of, sglang_imports
from sglang_source import API_CONTRACT, ARG_FIELDS_DIR, HTTP_SERVER, SERVER_ARGS, SglangSource, where

HTTP_METHODS = {"get", "post", "put", "delete", "patch", "head", "options"}
# what the generated contract codec may import: it is the only sglang code these tests execute
API_CONTRACT_IMPORTS = {"__future__", "typing", "msgspec"}


# ---- HTTP routes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Route:
    path: str
    methods: frozenset[str]
    handler: ast.FunctionDef | ast.AsyncFunctionDef
    location: str


def routes(src: SglangSource, path: str = HTTP_SERVER) -> dict[str, list[Route]]:
    """Every `@app.<method>("/p")` and `@app.api_route("/p", methods=[...])` in http_server.py.

    Both decorator styles are read (FastAPI's api_route defaults to GET when `methods` is left
    out); routes whose path is not a string literal (env-configurable aliases) are skipped.
    A path may be declared by several handlers, hence the list.
    """
    found: dict[str, list[Route]] = {}
    for node in ast.walk(src.tree(path)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for deco in node.decorator_list:
            if not (isinstance(deco, ast.Call) and isinstance(deco.func, ast.Attribute)):
                continue
            kind = deco.func.attr
            if kind not in HTTP_METHODS and kind != "api_route":
                continue
            route_path = const_str(deco.args[0]) if deco.args else const_str(keyword(deco, "path"))
            if route_path is None:
                continue
            if kind == "api_route":
                methods_node = keyword(deco, "methods")
                methods = {m.upper() for m in const_str_list(methods_node)} if methods_node is not None else {"GET"}
            else:
                methods = {kind.upper()}
            found.setdefault(route_path, []).append(Route(route_path, frozenset(methods), node, where(path, deco)))
    return found


def request_model(src: SglangSource, route: Route, path: str = HTTP_SERVER) -> tuple[str, str] | None:
    """(module file, class name) of the JSON body model a handler declares, or None.

    FastAPI parses the body into the annotated parameter type, written either as `obj: X` or
    `obj: Annotated[X, Body()]`; the model is the parameter type that the handler's module
    imports from sglang itself (Request, Query and the like come from fastapi).
    """
    imports = sglang_imports(src, path)
    for arg in route.handler.args.args + route.handler.args.kwonlyargs:
        ann = arg.annotation
        if ann is None:
            continue
        if isinstance(ann, ast.Subscript) and name_of(ann.value) == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            ann = elts[0]
        name = name_of(ann)
        if name in imports:
            file = src.module_file(imports[name])
            if file is not None:
                return file, name
    return None


def handler_dict_keys(src: SglangSource, route: Route, path: str = HTTP_SERVER) -> dict[str, str]:
    """String keys of the dict literals a handler builds, following plain calls to other
    functions of the same module one level deep (e.g. /get_model_info → model_info())."""
    module_funcs = {n.name: n for n in src.tree(path).body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    bodies = [route.handler]
    for node in ast.walk(route.handler):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in module_funcs:
            bodies.append(module_funcs[node.func.id])
    keys: dict[str, str] = {}
    for body in bodies:
        for node in ast.walk(body):
            if isinstance(node, ast.Dict):
                for key in node.keys:
                    if (k := const_str(key)) is not None:
                        keys.setdefault(k, where(path, key))
    return keys


def deprecated_routes(src: SglangSource, path: str = HTTP_SERVER) -> dict[str, str]:
    """{route: its handler's docstring} for handlers whose docstring says they are deprecated."""
    found = {}
    for route_path, declared in routes(src, path).items():
        for r in declared:
            doc = ast.get_docstring(r.handler) or ""
            if "deprecated" in doc.lower():
                found[route_path] = doc.strip().splitlines()[0]
    return found


# ---- classes and their fields -----------------------------------------------------------------


def find_class(src: SglangSource, path: str, name: str) -> ast.ClassDef:
    for node in ast.walk(src.tree(path)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            return node
    raise LookupError(f"class {name} is not defined in {path}")


def class_fields(src: SglangSource, path: str, name: str) -> dict[str, str]:
    """Keyword names a class accepts → where each is declared.

    Reads `__init__` parameters when the class defines `__init__`, class-level annotated fields
    otherwise (dataclasses, msgspec Structs, pydantic models), and adds the fields of its base
    classes found in the same module or imported from another sglang module. ClassVar
    annotations are not fields.
    """
    cls = find_class(src, path, name)
    fields: dict[str, str] = {}
    imports = sglang_imports(src, path)
    for base in cls.bases:
        base_name = name_of(base)
        if base_name is None:
            continue
        base_file = path if defines_class(src, path, base_name) else None
        if base_file is None and base_name in imports:
            base_file = src.module_file(imports[base_name])
        if base_file is not None and defines_class(src, base_file, base_name):
            fields.update(class_fields(src, base_file, base_name))
    init = next(
        (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == "__init__"),
        None,
    )
    if init is not None:
        params = init.args.posonlyargs + init.args.args + init.args.kwonlyargs
        for arg in params[1:] if params and params[0].arg == "self" else params:
            fields[arg.arg] = where(path, arg)
        return fields
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if "ClassVar" in ast.unparse(node.annotation):
                continue
            fields[node.target.id] = where(path, node)
    return fields


def literal_values(src: SglangSource, path: str, class_name: str, field_name: str) -> set[str]:
    """The string values of a `field: Literal[...]` annotation (empty if not a Literal)."""
    cls = find_class(src, path, class_name)
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == field_name:
            return {
                n.value for n in ast.walk(node.annotation) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            }
    return set()


def field_default(src: SglangSource, path: str, class_name: str, field_name: str) -> object:
    """The literal default of a class-level field (`flush_cache: bool = True` -> True); LookupError
    when the field is not there or its default is not a literal."""
    for node in find_class(src, path, class_name).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == field_name:
            if node.value is not None:
                try:
                    return ast.literal_eval(node.value)
                except ValueError:
                    break
    raise LookupError(f"{class_name}.{field_name} in {path} has no literal default")


def load_api_contract(src: SglangSource) -> types.ModuleType | None:
    """SGLang's generated JSON contract codec (`API_CONTRACT`), loaded from the wheel as a module,
    or None when this release has none. It is the code SGLang runs on every /generate body (HTTP 400
    on a violation) and the schema of the answers; it is executed here only after checking that it
    imports nothing but `API_CONTRACT_IMPORTS` (plain msgspec structs and codec functions)."""
    if not src.has(API_CONTRACT):
        return None
    imported = set()
    for node in ast.walk(src.tree(API_CONTRACT)):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or ".").split(".")[0] if node.level == 0 else ".")
    if not imported <= API_CONTRACT_IMPORTS:
        raise RuntimeError(f"{API_CONTRACT} now imports {sorted(imported - API_CONTRACT_IMPORTS)}: not loading it")
    name = f"_sglang_{re.sub(r'[^0-9a-zA-Z]', '_', src.version)}_api_types"
    if name not in sys.modules:
        module = types.ModuleType(name, f"{API_CONTRACT} from {src.wheel.name}")
        sys.modules[name] = module  # msgspec resolves the structs' annotations through it
        exec(compile(src.read(API_CONTRACT), f"{src.wheel.name}/{API_CONTRACT}", "exec"), module.__dict__)
    return sys.modules[name]


# ---- server CLI flags -------------------------------------------------------------------------


def server_flags(src: SglangSource) -> dict[str, tuple[bool | None, str]]:
    """Every `--flag` of `sglang.launch_server` → (takes a value?, where declared).

    Two places declare flags: explicit `parser.add_argument("--x", ...)` calls in server_args.py
    (all of them in older releases), and, in newer ones, annotated fields in
    sglang/srt/arg_groups/fields/*.py: `name: A[T, "help"]` or `A[T, Arg(...)]` becomes
    `--name-with-hyphens` (or Arg's `cli_name`, plus its `aliases`) unless `no_cli=True`; a bool
    field is a bare store_true flag. "Takes a value" is None where the source does not say.
    """
    flags: dict[str, tuple[bool | None, str]] = {}
    for node in ast.walk(src.tree(SERVER_ARGS)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument":
            names = [s for a in node.args if (s := const_str(a)) is not None and s.startswith("--")]
            action = const_str(keyword(node, "action"))
            if keyword(node, "action") is None:
                takes_value: bool | None = True
            elif action in ("store_true", "store_false", "store_const", "count"):
                takes_value = False
            else:
                takes_value = None
            for name in names:
                flags.setdefault(name, (takes_value, where(SERVER_ARGS, node)))
    for path in sorted(p for p in src.names if p.startswith(ARG_FIELDS_DIR) and p.endswith(".py")):
        for node in ast.walk(src.tree(path)):
            if not (isinstance(node, ast.ClassDef)):
                continue
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    for name, takes_value in _annotated_field_flags(stmt.target.id, stmt.annotation):
                        flags.setdefault(name, (takes_value, where(path, stmt)))
    return flags


def _annotated_field_flags(field_name: str, ann: ast.expr) -> list[tuple[str, bool]]:
    if not (isinstance(ann, ast.Subscript) and name_of(ann.value) in ("A", "Annotated")):
        return []
    elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
    inner, metas = elts[0], elts[1:]
    is_bool = ast.unparse(inner) in ("bool", "Optional[bool]", "bool | None")
    for meta in metas:
        if const_str(meta) is not None:
            return [("--" + field_name.replace("_", "-"), not is_bool)]
        if isinstance(meta, ast.Call) and name_of(meta.func) == "Arg":
            no_cli = keyword(meta, "no_cli")
            if isinstance(no_cli, ast.Constant) and no_cli.value is True:
                return []
            action = keyword(meta, "action")
            takes_value = not is_bool and action is None
            cli_name = const_str(keyword(meta, "cli_name")) or "--" + field_name.replace("_", "-")
            aliases = const_str_list(keyword(meta, "aliases"))
            return [(n, takes_value) for n in [cli_name, *aliases]]
    return []
