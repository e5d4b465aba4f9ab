"""The training loop and its programs: the loop never names a program, the pmap and
pjit strategies are what it is given, and no import cycle joins the loop, the programs
and the config checks (a static read of the modules' imports, top-level and deferred)."""

import ast
import os

import pytest

from train_helpers import ROOT

LOOP_MODULES = {"pretrain.loop": "pretrain/loop.py", "pretrain.parallel": "pretrain/parallel.py",
                "pretrain.train": "pretrain/train.py", "pretrain.transfer.trainer": "pretrain/transfer/trainer.py",
                "pretrain.config_checks": "pretrain/config_checks.py", "pretrain.resolve": "pretrain/resolve.py"}


def imported(path: str) -> set[str]:
    """Every `pretrain...` module a file imports, at any depth of its code."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pretrain"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("pretrain"))
    return found & set(LOOP_MODULES)


def test_no_import_cycle_joins_the_loop_the_programs_and_the_config_checks():
    graph = {module: imported(path) for module, path in LOOP_MODULES.items()}
    assert "pretrain.loop" in graph["pretrain.train"] and "pretrain.loop" in graph["pretrain.transfer.trainer"]
    assert "pretrain.loop" in graph["pretrain.config_checks"]  # the loop's own fields are checked there

    def reaches(start: str, goal: str, seen: frozenset = frozenset()) -> bool:
        return any(step == goal or (step not in seen and reaches(step, goal, seen | {step}))
                   for step in graph[start])

    cycles = [module for module in graph if reaches(module, module)]
    assert not cycles, {module: sorted(graph[module]) for module in cycles}


@pytest.mark.parametrize("name", ["pretrain/loop.py", "pretrain/parallel.py"])
def test_the_loop_and_the_strategies_name_no_program_and_no_objective(name):
    """What is trained is the program's business: the loop's code reads no objective
    module, mixture, input pipeline, task or body, names no program, and branches on no
    parallelism name (its metrics groups are the program's `names`)."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as handle:
        code = "\n".join(line for line in handle.read().splitlines() if not line.lstrip().startswith("#"))
    body = code.split('"""', 2)[2]  # after the module docstring, which says what the loop serves
    for word in ("import objectives", "mixture", "pipeline", ".task", "bodies", "FinetuningProgram",
                 "PretrainingProgram", "transfer"):
        assert word not in body, (name, word)
    if name == "pretrain/loop.py":
        assert '"pmap"' not in body and '"pjit"' not in body and "parallelism ==" not in body
