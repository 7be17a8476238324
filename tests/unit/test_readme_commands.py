"""Every ``python jobs/<job>.py ...`` command the docs show parses with its job's schema: a renamed
or mistyped key in the code or in the docs fails here, not in front of a user."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pipeline.bench import MODES
from pipeline.cache.job import CacheConfig
from pipeline.config import _load_preset
from pipeline.cache.inspect import InspectConfig
from pipeline.evaluate.evaluator import EvalConfig
from pipeline.evaluate.segment import SegmentConfig
from pipeline.plan import PlanConfig
from pipeline.train.job import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", ROOT / "infra" / "README.md"]
SCHEMAS = {"cache_teacher.py": CacheConfig, "train_student.py": TrainConfig, "evaluate.py": EvalConfig,
           "segment.py": SegmentConfig, "plan.py": PlanConfig, "inspect_cache.py": InspectConfig}


def documented_commands() -> list[tuple[str, list[str]]]:
    """(where, argv after the script) of every job command in a bash block of the docs."""
    found = []
    for doc in DOCS:
        for block in re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S):
            for n, line in enumerate(block.replace("\\\n", " ").splitlines()):
                words = shlex.split(line, comments=True)
                for i, w in enumerate(words):
                    if w.endswith(tuple(f"jobs/{s}" for s in [*SCHEMAS, "benchmark.py"])) and i and "python" in words[i - 1]:
                        end = next((j for j in range(i + 1, len(words)) if words[j] in ("&&", ";", "|")), len(words))
                        found.append((f"{doc.name}: {line.strip()[:80]}", [Path(w).name, *words[i + 1:end]]))
    return found


COMMANDS = documented_commands()


def test_the_docs_show_every_job():
    shown = {argv[0] for _, argv in COMMANDS}
    assert shown == {*SCHEMAS, "benchmark.py"}, shown


@pytest.mark.parametrize("where,argv", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses_with_its_schema(where, argv):
    script, args = argv[0], argv[1:]
    if script == "benchmark.py":
        assert args and args[0] in MODES, where
        schema, args = MODES[args[0]][0], args[1:]
    else:
        schema = SCHEMAS[script]
    cfg = OmegaConf.structured(schema)
    for preset in [a for a in args if "=" not in a and not a.startswith(("…", "..."))]:
        cfg = OmegaConf.merge(cfg, _load_preset(preset))
    overrides = [a for a in args if "=" in a]
    OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))  # unknown keys and wrong types raise
