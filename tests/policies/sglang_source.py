"""Read the source of the newest sglang release without installing, importing or running it.

SGLang needs a GPU and pins its own torch, so it cannot be installed on the project's CPU
machines; its wheel, though, is a zip of Python files. `ensure_wheel` downloads it once with
`pip download sglang --no-deps --only-binary=:all:` into ~/.cache/asyncrl/sglang/ and reuses
any wheel already there (delete that folder to check a newer release). `SglangSource` reads
files straight out of the zip and parses them with `ast`; the functions below pull out the
facts the contract test (test_sglang_contract.py) compares the client with: HTTP routes and
their request models, dataclass/Struct fields, dict keys written into a response, CLI flags.
Every fact carries its "file:line" so a failure points at the sglang source.

When the wheel can be neither found nor downloaded, `ensure_wheel` raises SglangUnavailable,
whose message names the command that failed; the tests skip with it.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CACHE_DIR = Path.home() / ".cache" / "asyncrl" / "sglang"
DOWNLOAD_TIMEOUT_S = 600
HTTP_METHODS = {"get", "post", "put", "delete", "patch", "head", "options"}

HTTP_SERVER = "sglang/srt/entrypoints/http_server.py"
IO_STRUCT = "sglang/srt/managers/io_struct.py"
SERVER_ARGS = "sglang/srt/server_args.py"
SAMPLING_PARAMS = "sglang/srt/sampling/sampling_params.py"
TOKENIZER_MANAGER = "sglang/srt/managers/tokenizer_manager.py"
DETOKENIZER_MANAGER = "sglang/srt/managers/detokenizer_manager.py"
SCHEDULE_BATCH = "sglang/srt/managers/schedule_batch.py"  # BaseFinishReason.to_json
ARG_FIELDS_DIR = "sglang/srt/arg_groups/fields/"  # newer releases declare server flags here
API_CONTRACT = "sglang/api/v1/api_types.py"  # newer releases gate /generate bodies with it
WEIGHT_UPDATER = "sglang/srt/managers/scheduler_components/weight_updater.py"  # 0.5.23: sessions
# what the generated contract codec may import: it is the only sglang code these tests execute
API_CONTRACT_IMPORTS = {"__future__", "typing", "msgspec"}


class SglangUnavailable(RuntimeError):
    """No sglang wheel in the cache and the download failed (e.g. offline)."""


# ---- obtaining the wheel -----------------------------------------------------------------


def download_command(dest: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "sglang", "--no-deps", "--only-binary=:all:", "-d", str(dest)]


def cached_wheel(cache_dir: Path = CACHE_DIR) -> Path | None:
    """The newest sglang wheel in `cache_dir`, or None."""
    wheels = list(cache_dir.glob("sglang-*.whl"))
    if not wheels:
        return None
    return max(wheels, key=lambda p: (_version_key(p.name.split("-")[1]), p.stat().st_mtime))


def ensure_wheel(cache_dir: Path = CACHE_DIR) -> Path:
    """A cached sglang wheel, downloading the newest one first if the cache has none.

    pip writes into a private temporary folder that is moved into place only when complete, so
    an interrupted download never looks like a cached wheel (and two test processes racing
    each end up with one whole file).
    """
    if (wheel := cached_wheel(cache_dir)) is not None:
        return wheel
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    cmd = download_command(tmp)
    try:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise SglangUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from None
        if proc.returncode != 0:
            tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
            raise SglangUnavailable(f"`{' '.join(cmd)}` exited with {proc.returncode}: {tail}")
        got = list(tmp.glob("sglang-*.whl"))
        if not got:
            raise SglangUnavailable(f"`{' '.join(cmd)}` produced no sglang wheel in {tmp}")
        final = cache_dir / got[0].name
        os.replace(got[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _version_key(version: str) -> tuple:
    try:
        from packaging.version import Version

        return (0, Version(version))
    except Exception:  # noqa: BLE001 - an odd file name sorts first, by mtime
        return (-1, version)


# ---- reading the source ------------------------------------------------------------------


@dataclass
class SglangSource:
    """The Python files of one sglang wheel, read and parsed on demand (parse results cached)."""

    wheel: Path
    _zip: zipfile.ZipFile = field(init=False, repr=False)
    _trees: dict[str, ast.Module] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        try:
            self._zip = zipfile.ZipFile(self.wheel)
        except zipfile.BadZipFile:
            raise RuntimeError(f"{self.wheel} is not a valid wheel; delete it to download a fresh one") from None
        self.names = set(self._zip.namelist())

    @property
    def version(self) -> str:
        for name in self.names:
            if name.endswith(".dist-info/METADATA"):
                match = re.search(r"^Version:\s*(\S+)", self.read(name), re.M)
                if match:
                    return match.group(1)
        return self.wheel.name.split("-")[1]

    def has(self, path: str) -> bool:
        return path in self.names

    def read(self, path: str) -> str:
        if path not in self.names:
            raise FileNotFoundError(f"{path} is not in {self.wheel.name}")
        return self._zip.read(path).decode("utf-8")

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            self._trees[path] = ast.parse(self.read(path), filename=path)
        return self._trees[path]

    def module_file(self, module: str) -> str | None:
        """`sglang.srt.x` → the file in the wheel that defines it, or None."""
        base = module.replace(".", "/")
        for candidate in (base + ".py", base + "/__init__.py"):
            if candidate in self.names:
                return candidate
        return None

    def close(self) -> None:
        self._zip.close()


def where(path: str, node: ast.AST) -> str:
    return f"{path}:{getattr(node, 'lineno', '?')}"


# ---- HTTP routes -------------------------------------------------------------------------


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
            route_path = _const_str(deco.args[0]) if deco.args else _const_str(_keyword(deco, "path"))
            if route_path is None:
                continue
            if kind == "api_route":
                methods_node = _keyword(deco, "methods")
                methods = {m.upper() for m in _const_str_list(methods_node)} if methods_node is not None else {"GET"}
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
    imports = _sglang_imports(src, path)
    for arg in route.handler.args.args + route.handler.args.kwonlyargs:
        ann = arg.annotation
        if ann is None:
            continue
        if isinstance(ann, ast.Subscript) and _name_of(ann.value) == "Annotated":
            elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
            ann = elts[0]
        name = _name_of(ann)
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
                    if (k := _const_str(key)) is not None:
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


# ---- classes and their fields ------------------------------------------------------------


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
    imports = _sglang_imports(src, path)
    for base in cls.bases:
        base_name = _name_of(base)
        if base_name is None:
            continue
        base_file = path if _defines_class(src, path, base_name) else None
        if base_file is None and base_name in imports:
            base_file = src.module_file(imports[base_name])
        if base_file is not None and _defines_class(src, base_file, base_name):
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


# ---- dict keys SGLang writes into the /generate response --------------------------------


def meta_info_sources(src: SglangSource) -> list[str]:
    """tokenizer_manager.py (which builds meta_info), the sglang modules it imports that touch
    meta_info (e.g. weight-version and time-stats helpers), and detokenizer_manager.py."""
    files = [TOKENIZER_MANAGER]
    for module in set(_sglang_imports(src, TOKENIZER_MANAGER).values()):
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
                        _add_dict_keys(keys, inner, path)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if _is_meta_info(target) and isinstance(node.value, ast.Dict):
                        _add_dict_keys(keys, node.value, path)
                    if isinstance(target, ast.Subscript) and _is_meta_info(target.value):
                        if (k := _const_str(target.slice)) is not None:
                            keys.setdefault(k, where(path, target))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if not _is_meta_info(node.func.value):
                    continue
                if node.func.attr == "update":
                    for arg in node.args:
                        if isinstance(arg, ast.Dict):
                            _add_dict_keys(keys, arg, path)
                    for kw in node.keywords:
                        if kw.arg is not None:
                            keys.setdefault(kw.arg, where(path, kw))
                elif node.func.attr == "setdefault" and node.args:
                    if (k := _const_str(node.args[0])) is not None:
                        keys.setdefault(k, where(path, node))
    return keys


def generate_top_level_keys(src: SglangSource) -> dict[str, str]:
    """Keys of the dicts tokenizer_manager.py returns as a generate result (those that carry a
    "meta_info" key), plus keys stored into such an output dict: `out["text"] = ...`."""
    keys: dict[str, str] = {}
    tree = src.tree(TOKENIZER_MANAGER)
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and "meta_info" in {_const_str(k) for k in node.keys}:
            _add_dict_keys(keys, node, TOKENIZER_MANAGER)
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
                    _add_dict_keys(keys, inner, SCHEDULE_BATCH)
                    for k, v in zip(inner.keys, inner.values):
                        if _const_str(k) == "type" and (t := _const_str(v)) is not None:
                            types.add(t)
    return keys, types


# ---- server CLI flags --------------------------------------------------------------------


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
            names = [s for a in node.args if (s := _const_str(a)) is not None and s.startswith("--")]
            action = _const_str(_keyword(node, "action"))
            if _keyword(node, "action") is None:
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
    if not (isinstance(ann, ast.Subscript) and _name_of(ann.value) in ("A", "Annotated")):
        return []
    elts = ann.slice.elts if isinstance(ann.slice, ast.Tuple) else [ann.slice]
    inner, metas = elts[0], elts[1:]
    is_bool = ast.unparse(inner) in ("bool", "Optional[bool]", "bool | None")
    for meta in metas:
        if _const_str(meta) is not None:
            return [("--" + field_name.replace("_", "-"), not is_bool)]
        if isinstance(meta, ast.Call) and _name_of(meta.func) == "Arg":
            no_cli = _keyword(meta, "no_cli")
            if isinstance(no_cli, ast.Constant) and no_cli.value is True:
                return []
            action = _keyword(meta, "action")
            takes_value = not is_bool and action is None
            cli_name = _const_str(_keyword(meta, "cli_name")) or "--" + field_name.replace("_", "-")
            aliases = _const_str_list(_keyword(meta, "aliases"))
            return [(n, takes_value) for n in [cli_name, *aliases]]
    return []


# ---- small AST helpers -------------------------------------------------------------------


def _const_str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _const_str_list(node: ast.AST | None) -> list[str]:
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [s for e in node.elts if (s := _const_str(e)) is not None]
    return []


def _keyword(call: ast.Call | None, name: str) -> ast.expr | None:
    if call is None:
        return None
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _name_of(node: ast.AST | None) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return None


def _is_meta_info(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return "meta_info" in node.id
    if isinstance(node, ast.Attribute):
        return "meta_info" in node.attr
    if isinstance(node, ast.Subscript):
        return _const_str(node.slice) == "meta_info"
    return False


def _add_dict_keys(keys: dict[str, str], node: ast.Dict, path: str) -> None:
    for key in node.keys:
        if (k := _const_str(key)) is not None:
            keys.setdefault(k, where(path, key))


def _defines_class(src: SglangSource, path: str, name: str) -> bool:
    return any(isinstance(n, ast.ClassDef) and n.name == name for n in src.tree(path).body)


def _sglang_imports(src: SglangSource, path: str) -> dict[str, str]:
    """Names a module imports from sglang modules: {name: "sglang.x.y"} (top-level imports only)."""
    imported: dict[str, str] = {}
    for node in src.tree(path).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sglang") and node.level == 0:
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    return imported
