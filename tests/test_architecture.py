"""The import rules of docs/architecture.md ("Rooms and who may import whom"), enforced.

Every ``import`` in ``src/atm`` (module level and inside functions: a lazy import is still a
dependency) is parsed with ``ast`` and checked against the rooms below; the whole graph must have
no import cycle. A new module belongs to the room of its package; a rule that has to change is
changed here and in docs/architecture.md together.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"

# room -> module prefixes (the longest matching prefix decides)
ROOMS: dict[str, tuple[str, ...]] = {
    "core": ("atm", "atm.errors", "atm.config", "atm.utils", "atm.constants", "atm.logs", "atm.artifacts"),
    "market": ("atm.market",),
    "prompting": ("atm.prompting",),
    "finetune": ("atm.finetune",),
    "export": ("atm.export",),
    "runtime": ("atm.runtime",),
    "serve": ("atm.serve",),
    "eval": ("atm.eval",),
    "commands": ("atm.cli", "atm.__main__", "atm.demo", "atm.doctor"),
}
# room -> the rooms it may import (its own always)
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "market": {"core"},
    "prompting": {"core", "market"},
    "finetune": {"core", "market", "prompting", "export"},
    "export": {"core", "market", "prompting"},
    "runtime": {"core", "prompting", "export"},
    "serve": {"core", "market", "prompting", "export", "runtime"},
    "eval": {"core", "market", "prompting", "export", "runtime"},
    "commands": set(ROOMS),
}
# inside a room: (importer prefix, imported prefix) pairs that must not exist, and why
FORBIDDEN: list[tuple[str, str, str]] = [
    *[("atm.serve.engines", t, "engines run models; HTTP routes, served-model resolution and the app sit above")
      for t in ("atm.serve.api", "atm.serve.app", "atm.serve.models", "atm.serve.advice", "atm.serve.cli",
                "atm.serve.chat")],
    ("atm.serve.ollama_codec", "atm.serve.api", "the codec serves the routes and the remote engine alike"),
    ("atm.serve.api", "atm.serve.app", "create_app wires the routers, not the other way round"),
    ("atm.serve.api", "atm.serve.cli", "the API does not know how it was started"),
    ("atm.serve.chat", "atm.serve.engines", "the chat UI is a client of `atm serve` over HTTP"),
    ("atm.serve.chat", "atm.serve.api", "the chat UI is a client of `atm serve` over HTTP"),
    *[(src, t, "providers answer items; running, scoring and reporting a run sit above them")
      for src in ("atm.eval.providers", "atm.eval.backends", "atm.eval.fanout", "atm.eval.baselines",
                  "atm.eval.classic.provider",
                  "atm.eval.classic.core", "atm.eval.classic.models", "atm.eval.classic.design")
      for t in ("atm.eval.harness", "atm.eval.rundir", "atm.eval.scoring", "atm.eval.report", "atm.eval.cli")],
    *[(src, "atm.eval.backends", "backends are loaded by name from the provider registry; what they share "
       "(Transient, the retry loop, GenerationSpec) lives in atm.eval.providers")
      for src in ("atm.eval.providers", "atm.eval.fanout", "atm.eval.harness")],
    ("atm.eval.harness", "atm.eval.report", "the CLI writes the report after a run"),
    *[("atm.eval.rundir", t, "run-directory I/O is the bottom of a run") for t in
      ("atm.eval.harness", "atm.eval.scoring", "atm.eval.report")],
    *[("atm.eval.scoring", t, "scoring reads a run directory only") for t in ("atm.eval.harness", "atm.eval.report")],
    ("atm.export.gguf", "atm.export.modelfile", "both render chat templates through export.chat_template"),
    ("atm.export.modelfile", "atm.export.gguf", "both render chat templates through export.chat_template"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "atm").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    """The ATM modules ``module`` imports (``from a import b`` is a.b when b is a module)."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            if n == "atm" or n.startswith("atm."):
                target = _resolve(n)
                if target and target != module:
                    out.add(target)
    return out


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def room_of(module: str) -> str:
    best, room = -1, None
    for r, prefixes in ROOMS.items():
        for pre in prefixes:
            if (module == pre or module.startswith(pre + ".")) and len(pre) > best:
                best, room = len(pre), r
    assert room is not None, module
    return room


def _is_cli(module: str) -> bool:
    last = module.rsplit(".", 1)[-1]
    return last == "cli" or last.endswith("_cli")


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_module_is_in_a_room():
    for m in MODULES:
        room_of(m)


def test_rooms_import_only_what_they_may():
    bad = []
    for m, targets in GRAPH.items():
        src = room_of(m)
        for t in targets:
            dst = room_of(t)
            if dst == src or dst in MAY_IMPORT[src]:
                continue
            if dst == "commands" and _is_cli(m) and t == "atm.cli":
                continue  # a stage's CLI module uses the shared argparse helpers of atm.cli
            bad.append(f"{m} ({src}) imports {t} ({dst})")
    assert not bad, "imports across rooms that docs/architecture.md does not allow:\n" + "\n".join(sorted(bad))


def test_forbidden_imports_inside_rooms():
    bad = [f"{m} imports {t}: {why}" for m, targets in GRAPH.items() for t in targets
           for src, dst, why in FORBIDDEN if _under(m, src) and _under(t, dst)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycles():
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_real_imports():
    """The graph is not empty by accident: known edges are found, lazy ones included."""
    assert "atm.serve.engines.base" in GRAPH["atm.serve.engines.llama_server"]
    assert "atm.runtime.llama_server" in GRAPH["atm.serve.engines.llama_server"]
    assert "atm.eval.report" in GRAPH["atm.eval.cli"]  # a lazy import inside cmd_run
    assert room_of("atm.serve.api.openai") == "serve" and room_of("atm.artifacts") == "core"
    assert "atm.prompting.contract" in GRAPH["atm.serve.models"]  # a lazy import in ServedModel.contract
    assert "atm.eval.backends.openai" in GRAPH["atm.eval.backends.atm"]


def test_the_rules_are_documented():
    text = DOC.read_text()
    for room in ROOMS:
        assert f"`{room}`" in text, f"docs/architecture.md does not describe the room {room!r}"
    for src, dst, _ in FORBIDDEN:
        assert src in text or src.rsplit(".", 1)[0] in text, src
