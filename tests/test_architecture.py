"""The house rules, checked: what each layer may import, how big a room may grow, no import cycles, one
spelling for each run file's name, and tests that find their shared parts in tests/fixtures/.

Each rule fails with the list of its offenders. The limits are the ones docs/architecture.md states: a
module of at most 500 lines, a class of at most 250, a function of at most 120."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from fixtures import REPO

PACKAGES = ("runspec", "trainer", "infra")  # the project's own code; scripts/ are entry points beside it
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 500, 250, 120


def _project_files(packages=PACKAGES) -> list[Path]:
    return sorted(p for package in packages for p in (REPO / package).rglob("*.py"))


def _length(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


# ---------------------------------------------------------------- the layering rule
def _imports(package: str) -> set[str]:
    names = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
    return names


def test_trainer_never_imports_cloud_libraries():
    assert not _imports("trainer") & {"boto3", "botocore", "fabric", "paramiko", "invoke", "infra"}


def test_runspec_is_standard_library_only():
    """It runs as `python3 -c` on a machine where nothing is installed (remote.list_runs)."""
    outside = _imports("runspec") - set(sys.stdlib_module_names) - {"runspec"}  # its own modules are fine
    assert not outside, outside
    assert not _imports("trainer") & {"infra"} and not _imports("infra") & {"trainer"}


def test_infra_never_imports_torch():
    assert not _imports("infra") & {"torch", "torchvision", "trainer", "numpy"}
    code = "import sys, infra.commands; assert 'torch' not in sys.modules, 'torch was imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def _module_imports(path: Path, name: str) -> set[str]:
    """The project modules a file imports, at any level (inside functions too), relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(x for x in (base, node.module) if x)
            out |= {module} | {f"{module}.{a.name}" for a in node.names}
    return out


def _project_graph() -> dict[str, set[str]]:
    files = {}
    for package in ("runspec", "trainer", "infra", "scripts"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            files[name] = path
    return {name: {m for m in _module_imports(path, name) if m in files and m != name}
            for name, path in files.items()}


def test_only_the_resolver_meets_ec2_below_the_cli():
    """The transport (SSH, sync, jobs, agents) reaches EC2 only through infra/resolve.py: a name becomes
    endpoints there. The provisioning commands (infra/ec2/, the CLI) are the AWS layer's users."""
    graph = _project_graph()
    ec2 = {name for name in graph if name == "infra.ec2" or name.startswith("infra.ec2.")}
    allowed = {"infra.aws", "infra.commands.options", "infra.commands.launch", "infra.commands.lifecycle",
               "infra.commands.budget", "infra.commands.status",
               "infra.resolve", "infra.pricing", "infra.plan", "infra.landing", "infra"} | ec2
    for name, deps in graph.items():
        if name.startswith("infra") and name not in allowed:
            assert not deps & ({"infra.aws"} | ec2), (name, deps & ({"infra.aws"} | ec2))
    for path in (REPO / "infra").rglob("*.py"):
        if path.stem != "aws":  # the only boto3 user
            assert not {m.split(".")[0] for m in _module_imports(path, "infra")} & {"boto3", "botocore"}, path


# ---------------------------------------------------------------- no import cycles
def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles a depth-first walk of `graph` meets, each as [a, b, ..., a]."""
    cycles = []

    def visit(node, stack):
        for dep in sorted(graph[node]):
            if dep in stack:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in done:
                visit(dep, stack + [dep])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    return cycles


def test_no_import_cycles_among_the_projects_modules():
    """Counting imports inside functions: a cycle hidden in a function is still a knot to untie."""
    cycles = _cycles(_project_graph())
    assert not cycles, cycles


def _import_time_imports(path: Path, name: str) -> set[str]:
    """The project modules a file imports while it is being imported: module level, including inside
    if/try/with blocks and class bodies, but not inside functions (they run later), nor under
    `if TYPE_CHECKING:` (never at run time). Relative imports resolved as in _module_imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def walk(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                walk(ast.Module(body=child.orelse, type_ignores=[]))  # its else: runs
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.rsplit(".", child.level - 1)[0] if child.level else ""
                module = ".".join(x for x in (base, child.module) if x)
                out.update({module} | {f"{module}.{a.name}" for a in child.names})
            walk(child)

    walk(ast.parse(path.read_text()))
    return out


def test_no_import_cycle_at_import_time():
    """Among trainer/, infra/ and runspec/, counting only the imports that run while a module is being
    imported (module level, as Python executes them; see _import_time_imports): a cycle there fails
    at import, or half-works depending on which module is imported first. The stricter rule above also
    counts imports inside functions."""
    files = {".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): path
             for path in _project_files()}
    graph = {name: {m for m in _import_time_imports(path, name) if m in files and m != name}
             for name, path in files.items()}
    cycles = _cycles(graph)
    assert not cycles, f"import cycles at import time: {cycles}"


# ---------------------------------------------------------------- room sizes
def test_no_module_is_over_500_lines():
    """A module a newcomer can read through; a longer one holds rooms that want names of their own."""
    long = [f"{path.relative_to(REPO)} ({n} lines)" for path in _project_files()
            if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_class_is_over_250_lines():
    """A class that long does several jobs; each job wants a class (or module) of its own."""
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({_length(node)} lines)"
            for path in _project_files() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ClassDef) and _length(node) > MAX_CLASS_LINES]
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}"


def test_no_function_is_longer_than_a_screenful_and_a_half():
    """About 120 lines at most: a longer one hides steps that deserve names of their own."""
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({_length(node)} lines)"
            for path in _project_files((*PACKAGES, "scripts")) for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _length(node) > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


# ---------------------------------------------------------------- one vocabulary
def test_each_run_file_name_is_spelled_in_exactly_one_module():
    """Each name a run directory holds (runspec's CONFIG, METRICS, LOG, SUMMARY, RESULT, BEST, LAST, PREV,
    MODEL, REPORT, PLOTS, and any added later) is a string literal in one module only, runspec/__init__.py,
    where its constant is defined; every other module uses the constant. Counted: a literal that is the
    name or ends in /NAME, f-string pieces included; prose (docstrings, help) may name the files. The one
    exception is the standalone resume agent's LEGACY_STATUS_FILE (it cannot import runspec on the
    instance)."""
    import runspec

    home = Path(runspec.__file__).relative_to(REPO)
    names = {value for key, value in vars(runspec).items()
             if key.isupper() and not key.startswith("ENV_") and isinstance(value, str)}
    assert {runspec.CONFIG, runspec.METRICS, runspec.MODEL, runspec.LAST, runspec.PLOTS} <= names
    allowed = {("infra/agent/resume_agent.py", "LEGACY_STATUS_FILE")}
    spelled: dict[str, dict[str, list[int]]] = {name: {} for name in names}
    for path in _project_files((*PACKAGES, "scripts")):
        tree, where = ast.parse(path.read_text()), str(path.relative_to(REPO))
        exempt = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Assign)
                  for t in n.targets if isinstance(t, ast.Name) and (where, t.id) in allowed}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in exempt:
                for name in names:
                    if node.value == name or node.value.endswith("/" + name):
                        spelled[name].setdefault(where, []).append(node.lineno)
    offenders = {name: modules for name, modules in sorted(spelled.items()) if set(modules) != {str(home)}}
    assert not offenders, f"run file names spelled outside {home} (name: {{module: lines}}): {offenders}"


def test_the_other_ranks_recorder_is_silent_in_every_method():
    """Rank 0 writes the run; a method added to Recorder without its Silent twin would have every rank
    write it."""
    from trainer.recorder import Recorder, Silent

    ours = {name for name, value in vars(Recorder).items() if not name.startswith("_")}
    assert ours and ours <= set(vars(Silent)), sorted(ours - set(vars(Silent)))


# ---------------------------------------------------------------- the tests themselves
def test_no_test_module_imports_another_test_module():
    """What two test modules share lives in tests/fixtures/ (a fixture, or a helper imported from there):
    importing a test module runs its module-level code and drags its tests' fixtures along, and the
    next reader cannot tell where a shared piece lives."""
    tests = REPO / "tests"
    stems = {p.stem for p in tests.rglob("*.py") if p.name.startswith("test_") or p.stem.endswith("_test")}
    test_modules = stems | {f"tests.{stem}" for stem in stems}  # as imported with tests/ or the root on sys.path
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported = {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):  # from test_x import y; from tests (or .) import test_x
                module = node.module or ""
                imported = {module} | {f"{module}.{a.name}".lstrip(".") for a in node.names}
            else:
                continue
            hits = sorted(imported & test_modules)
            if hits:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} imports {', '.join(hits)}")
    assert not offenders, f"test modules imported by other modules: {offenders}"
