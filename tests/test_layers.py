"""The layers of the package: the command line (mlx_dpo.cli) sits on top; the pipeline, the trainer and
the schemas never import it, not even through another module or from inside a function."""

import ast
from pathlib import Path

import mlx_dpo

ROOT = Path(mlx_dpo.__file__).parent
BELOW_CLI = ("mlx_dpo.pipeline", "mlx_dpo.trainer", "mlx_dpo.schemas")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """Every mlx_dpo module that `path` (module `name`) imports, at the top or in a function, with the
    packages that importing it runs (their __init__)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            targets = [source] + [f"{source}.{alias.name}" for alias in node.names]  # `from . import cli`
        else:
            continue
        for target in targets:
            parts = target.split(".")
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & known
    return found - {name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: imported(path, name, set(files)) for name, path in files.items()}


def chain_to_cli(graph: dict[str, set[str]], start: str) -> list[str] | None:
    """The import chain from `start` to a module of mlx_dpo.cli, or None when there is none."""
    seen, stack = {start}, [[start]]
    while stack:
        chain = stack.pop()
        if chain[-1] == "mlx_dpo.cli" or chain[-1].startswith("mlx_dpo.cli."):
            return chain
        for target in sorted(graph[chain[-1]] - seen):
            seen.add(target)
            stack.append(chain + [target])
    return None


def test_graph_sees_imports():
    # The oracle of the test below: the CLI's own imports, relative and absolute, are found.
    graph = import_graph()
    assert {"mlx_dpo.cli.cache_cmds", "mlx_dpo.pipeline.config", "mlx_dpo.trainer.config"} <= graph["mlx_dpo.cli"]
    assert chain_to_cli(graph, "mlx_dpo.__main__") == ["mlx_dpo.__main__", "mlx_dpo.cli"]


def test_pipeline_trainer_schemas_never_import_the_cli():
    graph = import_graph()
    below = sorted(name for name in graph if name.startswith(BELOW_CLI))
    assert len(below) > 20  # the walk found the package's files
    chains = [" -> ".join(chain) for name in below if (chain := chain_to_cli(graph, name))]
    assert not chains, "imports of the command line below it:\n" + "\n".join(chains)
