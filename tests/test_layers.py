"""Layering: no module under ``pipeline/`` or ``jobs/`` imports from a layer above its own, and
nothing imports a job.

Every module is parsed with ``ast`` (nothing is imported), and every ``import`` counts,
module-level or inside a function. The layers, lowest first, as the code uses them:

0. **algorithm** - ``pipeline.selfrag``: the Self-RAG algorithm as pure Python. It imports
   nothing of ``pipeline`` outside itself, and never ``ray`` or ``vllm``.
1. **infrastructure** - what a run is built from, knowing nothing of runs: ``pipeline.infra``
   (config, secrets, paths and filesystems, console lines), ``pipeline.model`` (the tokenizer,
   vLLM's arguments and a synchronous engine), ``output.schema`` (the output's columns and
   their types) and ``output.folder`` (an output location, its storage and every name under
   it: the report and the export read outputs through it), ``retrieval``, ``synthetic``
   (the world, the demo data, the tiny model and its training), and the tools over a finished
   output: ``evaluation`` (metrics, file layouts, the synthetic suite, reading outputs back,
   the tables), ``export``, ``report`` (figures, page, ``report.write``).
2. **run bookkeeping** - the state of one run and its output location: the rest of
   ``pipeline.output`` (identity, lease, staged rows and the shards' success markers,
   manifest, run log) and ``pipeline.runtime`` (connecting to Ray, the metrics actor,
   progress, phase times, the phases a signal may hit).
3. **services** - ``pipeline.services``: the engine and retriever Serve deployments and the
   clients the stages call them through.
4. **stages** - ``pipeline.stages``: the Ray Data stages (they call the services' clients).
5. **run planning and assembly** - ``run.preflight`` (its id scan assigns ids exactly as the
   prepare stage does, so it uses ``stages.prepare``), ``run.dataflow`` (the chain of stages)
   and ``run.runner`` (where the run goes: on Ray or in this process; the preflight refuses an
   in-process run that cannot serve the job).
6. **runs** - ``pipeline.run``: what each job does, as library functions: the annotation run
   (preflight, lease, execute, manifest), the evaluation run (annotation runs per mode, so it
   sits here beside the annotation run and not in ``pipeline.evaluation``, whose modules only
   read and score outputs), the index build (it runs the embedding stage), the export, and
   the exit codes every job maps its outcome to (they name errors of every layer below).
7. **benchmarks** - ``pipeline.bench``: the benchmarks' code (they run the annotation run and
   the index build, and time the jobs as processes).
8. **jobs** - ``jobs.*``, the command-line entrypoints: parse, call the library, map the
   outcome to an exit code. Nothing imports a job: no module of ``pipeline``, no other job, and
   the tests only a job's ``main`` or ``parse_args`` (the command line itself).

A module may import its own layer and the ones below. A new module must be given a layer
here (the test names any module it cannot place).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: Module name prefix -> layer. The longest matching prefix decides (``pipeline.output`` and
#: everything under it, except ``pipeline.output.schema`` and ``pipeline.output.folder``).
LAYERS: dict[str, int] = {
    "pipeline.selfrag": 0,
    **dict.fromkeys([
        "pipeline.infra", "pipeline.model", "pipeline.output.schema", "pipeline.output.folder",
        "pipeline.retrieval", "pipeline.synthetic", "pipeline.evaluation", "pipeline.export", "pipeline.report",
    ], 1),
    **dict.fromkeys(["pipeline.output", "pipeline.runtime"], 2),
    "pipeline.services": 3,
    "pipeline.stages": 4,
    "pipeline.run.preflight": 5,
    "pipeline.run.dataflow": 5,
    "pipeline.run.runner": 5,
    "pipeline.run": 6,
    "pipeline.bench": 7,
    "jobs": 8,
}
NAMES = {0: "algorithm", 1: "infrastructure", 2: "run bookkeeping", 3: "services", 4: "stages",
         5: "run planning and assembly", 6: "runs", 7: "benchmarks", 8: "jobs"}
#: What a test may import from a job: its command line.
JOB_ENTRYPOINTS = {"main", "parse_args"}

#: Third-party packages the algorithm layer must never import.
NOT_IN_ALGORITHM = ("ray", "vllm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = sorted((REPO / "pipeline").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py"))
    return {module_name(p): p for p in files}


MODULES = project_modules()


def layer(name: str) -> int | None:
    """The layer of a project module (None: the empty top package ``pipeline`` itself)."""
    matches = [prefix for prefix in LAYERS if name == prefix or name.startswith(prefix + ".")]
    if not matches:
        return None
    return LAYERS[max(matches, key=len)]


def imports(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in a module, relative imports resolved; ``from A import b``
    counts as ``A.b`` when that is a module of the project, else as ``A``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else source))
    return found


def internal(target: str) -> bool:
    return target.split(".")[0] in ("pipeline", "jobs")


def test_every_module_has_a_layer():
    unplaced = [name for name in MODULES if name != "pipeline" and layer(name) is None]
    assert not unplaced, f"give these modules a layer in LAYERS (and the docstring): {unplaced}"


def test_the_parser_sees_imports_inside_functions_and_relative_ones():
    found = dict((m, line) for line, m in imports("pipeline.run.preflight", MODULES["pipeline.run.preflight"]))
    assert "pipeline.stages.prepare" in found  # imported inside scan_ids, relative
    assert "pipeline.output.folder" in found and "pipeline.infra.io" in found
    found = {m for _, m in imports("pipeline.run.output", MODULES["pipeline.run.output"])}
    assert "pipeline.output.staged_rows" in found  # "from ..output import staged_rows"
    assert "pipeline.report.write" in {m for _, m in imports("pipeline.run.annotate", MODULES["pipeline.run.annotate"])}


@pytest.mark.parametrize("name", [m for m in MODULES if m != "pipeline"])
def test_no_import_from_a_higher_layer(name):
    own = layer(name)
    upward = []
    for line, target in imports(name, MODULES[name]):
        if not internal(target) or target == "pipeline":
            continue
        theirs = layer(target)
        assert theirs is not None, f"{name}:{line} imports {target}, which is no module of the project"
        if theirs > own:
            upward.append(f"line {line}: {target} ({NAMES[theirs]})")
    assert not upward, f"{name} ({NAMES[own]}) imports from higher layers: {upward}"


@pytest.mark.parametrize("name", [m for m in MODULES if layer(m) == 0])
def test_the_algorithm_imports_only_itself_and_no_ray_or_vllm(name):
    bad = [f"line {line}: {target}" for line, target in imports(name, MODULES[name])
           if (internal(target) and layer(target) != 0) or target.split(".")[0] in NOT_IN_ALGORITHM]
    assert not bad, f"{name} must stay pure Python: {bad}"


def test_no_module_imports_a_job():
    """A job is a command line: neither ``pipeline`` nor another job imports one (what two jobs
    share lives in the library)."""
    bad = [f"{name}:{line} {target}" for name, path in MODULES.items()
           for line, target in imports(name, path) if target.split(".")[0] == "jobs"]
    assert not bad, bad


def test_tests_import_only_the_command_line_of_a_job():
    """Tests use the library; from a job they take only its entrypoint (``from jobs.X import main``)."""
    bad = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                bad += [f"{path.name}:{node.lineno} import {a.name}" for a in node.names
                        if a.name.split(".")[0] == "jobs"]
            elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "jobs":
                names = {a.name for a in node.names}
                if node.module == "jobs" or not names <= JOB_ENTRYPOINTS:
                    bad.append(f"{path.name}:{node.lineno} from {node.module} import {sorted(names)}")
    assert not bad, f"import these from the library instead: {bad}"
