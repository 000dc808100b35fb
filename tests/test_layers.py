"""The layering DESIGN.md asks for, read from the source: kernels import nothing of the trainer, the
core imports no stage, a stage imports no other stage (only the orchestrators do), and no module
imports itself back through a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATORS = {"rlhf_fast.stages.pipeline", "rlhf_fast.stages.rounds"}


def module_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "rlhf_fast").rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    for path in (ROOT / "kernels").glob("*.py"):
        name = "rlhf_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        files[name] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The rlhf_fast modules `name` imports at module level or inside functions."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            # a submodule importing its own package runs after that package's __init__: no cycle
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def test_kernels_import_nothing_of_the_trainer():
    for name, deps in graph().items():
        if name.startswith("rlhf_fast.kernels"):
            outside = {d for d in deps if not d.startswith("rlhf_fast.kernels")}
            assert not outside, f"{name} imports {sorted(outside)}"


def test_stages_import_only_the_layers_below_and_the_core_no_stage():
    for name, deps in graph().items():
        stages = {d for d in deps if d.startswith("rlhf_fast.stages") and d != "rlhf_fast.stages"}
        if name.startswith("rlhf_fast.stages") and name not in ORCHESTRATORS:
            assert not stages, f"stage {name} imports stage(s) {sorted(stages)}"
        elif not name.startswith(("rlhf_fast.stages", "rlhf_fast.demo", "rlhf_fast.cli", "rlhf_fast.selfcheck")):
            assert not stages, f"core module {name} imports stage(s) {sorted(stages)}"


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for dep in sorted(edges.get(node, ())):
            if state.get(dep) == 1:
                cycle = trail[trail.index(dep):] + [dep] if dep in trail else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, trail + [dep])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
