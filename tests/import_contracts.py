"""A contract type for import-linter (run by `make lint`): no module imports another module's private names.

    [[tool.importlinter.contracts]]
    type = "private_names"          # registered in pyproject.toml's contract_types

`from prefpipe.core.dataset import _helper` in any module of the root packages, or a relative import of a
`_name` from a sibling, breaks it: what is shared becomes public. Dunder names (`__version__`) are public.
import-linter's own `private_modules` contract covers private *modules*; no maintained contract covers
private *names*, so this one reads each module's import statements (the source files of the modules in
the import graph) with `ast`. Access to another module's private attribute (`module._name`) is ruff's
SLF001, also in `make lint`.
"""

from __future__ import annotations

import ast
import importlib.util

from grimp import ImportGraph
from importlinter.application import output
from importlinter.domain.contract import Contract, ContractCheck


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_name_imports(module: str, source: str, is_package: bool) -> list[tuple[str, str, int]]:
    """(imported module, private name, line) of every `from M import _name` in `source`, M != `module`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:  # relative: resolve against the importing module's package
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        if target == module:
            continue
        found += [(target, alias.name, node.lineno) for alias in node.names if is_private(alias.name)]
    return found


class PrivateNamesContract(Contract):
    type_name = "private_names"

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        ours = {m.split(".")[0] for m in graph.modules}
        broken = []
        for module in sorted(graph.modules):
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.origin or not spec.origin.endswith(".py"):
                continue
            with open(spec.origin, encoding="utf-8") as f:
                source = f.read()
            for target, name, line in private_name_imports(module, source, spec.submodule_search_locations is not None):
                if target.split(".")[0] in ours:
                    broken.append({"importer": module, "imported": target, "name": name, "line": line})
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        output.print_error("Private names imported from another module (make them public, or keep them in one module):",
                           bold=False)
        output.new_line()
        for b in check.metadata["broken"]:
            output.print_error(f"- {b['importer']} (l.{b['line']}) imports {b['name']} from {b['imported']}", bold=False)
        output.new_line()
