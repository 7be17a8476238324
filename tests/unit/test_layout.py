"""The package layout is a contract: one folder per stage, no import cycles, and stages that meet
only through the shared modules and the cache's reader."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAGES = ("cache", "train", "evaluate")
SHARED = ("pipeline", "pipeline.storage", "pipeline.config", "pipeline.cli", "pipeline.logs", "pipeline.devices",
          "pipeline.ray_utils", "pipeline.codecs", "pipeline.samples")
READER = "pipeline.cache.reader"  # the one module of a stage that other stages may import


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the model library and of the pipeline."""
    return {module_name(p): p for d in ("spar", "pipeline") for p in sorted((ROOT / d).rglob("*.py"))}


def imports(path: Path, known: set[str]) -> set[str]:
    """Every spar / pipeline module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        found.update(n for n in names if n in known)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in STAGES else None


def test_every_stage_is_a_folder_whose_init_maps_its_data_flow():
    mods = modules()
    for s in STAGES:
        init = ROOT / "pipeline" / s / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        members = [m.rsplit(".", 1)[1] for m in mods if m.startswith(f"pipeline.{s}.")]
        assert members, s
        for name in members:  # the map names every module of the stage
            assert f"{name}.py" in doc, f"pipeline/{s}/__init__.py does not map {name}.py"
            assert not name.startswith(f"{s}_"), f"pipeline/{s}/{name}.py repeats its folder's name"


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_stages_meet_only_through_shared_modules_and_the_cache_reader():
    bad = []
    for m, deps in graph().items():
        for n in deps:
            if m in SHARED and stage(n) and not (m == "pipeline" and n == READER):
                bad.append(f"shared module {m} imports the stage module {n}")
            elif stage(m) and stage(n) and stage(m) != stage(n) and n != READER:
                bad.append(f"{m} (stage {stage(m)}) imports {n} (stage {stage(n)})")
    assert not bad, "\n".join(bad)


def test_the_model_library_knows_nothing_of_the_pipeline():
    for path in (ROOT / "spar").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for name in names:
                    assert name.split(".")[0] not in ("pipeline", "ray", "deepspeed", "s3fs", "webdataset"), \
                        f"{path.relative_to(ROOT)} imports {name}"


def test_the_product_cites_only_its_own_documents():
    """Users have the project's docs/, not the team's working notes."""
    pattern = re.compile("shar" + "ed/|" + "SP" + "EC")  # spelled apart, so that this file passes its own grep
    files = [p for d in ("spar", "pipeline", "jobs", "tests", "infra") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".md", ".yaml", ".json", ".txt", ".toml")]
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in files + [ROOT / "README.md"] if p != Path(__file__)
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_the_cache_reader_loads_without_torch():
    """`open_cache` and the storage layer serve drivers, tools and tasks that only read a cache's
    manifest or bytes: they load in ~0.4 s without torch (~3 s with it); the writers import
    webdataset and torch where they write."""
    import subprocess
    import sys

    code = ("import sys; import pipeline.cache.reader, pipeline.storage; "
            "print(sorted(m for m in ('torch', 'webdataset', 'open_clip', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_cache_jobs_cpu_tasks_load_without_torch():
    """Ray Data's read, augment and write tasks import their functions' modules in every worker
    process they run in: those hold numpy, Arrow and the storage client, not torch (~2 CPU-s and
    ~450 MB peak RSS a process), which only the teacher actors need."""
    import subprocess
    import sys

    from pipeline.cache import job, tasks

    assert job.expand_tar is tasks.expand_tar and job.image_row is tasks.image_row
    assert job.write_batch is tasks.write_batch and job.augment_row.__module__ == "pipeline.cache.augment"
    code = ("import sys; import pipeline.cache.tasks, pipeline.cache.augment; "
            "print(sorted(m for m in ('torch', 'open_clip', 'deepspeed', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
