#!/usr/bin/env python3
"""Import circles between the files of each crate (and between crates).

    python3 scripts/import_cycles.py      # prints the file graph's circles; exit 1 if any

A file imports another when it names a path into it: `use crate::a::b`, `crate::a::b::x`,
`use super::c` (resolved against the module tree: `a.rs` or `a/mod.rs`). Crate edges come
from each crate's Cargo.toml. Test files and build output are left out.
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATH_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)+)")
GROUP_RE = re.compile(r"\b(crate|super)((?:::[A-Za-z_][A-Za-z0-9_]*)*)::\{([^{}]*)\}")


def paths(text: str):
    """(crate|super, [names]) of every path in `text`, `use x::{a, b::c}` groups expanded."""
    for kind, path in PATH_RE.findall(text):
        yield kind, path.strip(":").split("::")
    for kind, prefix, group in GROUP_RE.findall(text):
        base = [n for n in prefix.strip(":").split("::") if n]
        for item in group.split(","):
            first = item.strip().split("::")[0].split(" ")[0]
            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", first or "") and first != "self":
                yield kind, base + [first]


def module_files(src: Path) -> dict:
    """Module path (tuple) -> file, for every .rs file under src."""
    out = {}
    for f in src.rglob("*.rs"):
        rel = f.relative_to(src)
        if "bin" in rel.parts or rel.name == "tests.rs":
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] in ("lib", "mod", "main"):
            parts = parts[:-1]
        out[tuple(parts)] = f
    return out


def module_of(files: dict, f: Path) -> tuple:
    return next(m for m, g in files.items() if g == f)


def resolve(files: dict, base: tuple, names: list):
    """The deepest module file named by `base :: names`."""
    best = None
    for i in range(len(names) + 1):
        m = base + tuple(names[:i])
        if m in files:
            best = files[m]
    return best


def strongly_connected(graph: dict) -> list:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    circles = []
    crates = {}
    for toml in sorted(ROOT.glob("*/Cargo.toml")):
        crate_dir = toml.parent
        if crate_dir.name == "vendor":
            continue
        name = re.search(r'^name\s*=\s*"([^"]+)"', toml.read_text(), re.M).group(1)
        # Build dependencies only: dev-dependencies (tests) may point anywhere below.
        deps = toml.read_text().split("[dev-dependencies]")[0]
        crates[name] = set(re.findall(r"^(switchyard-[a-z]+)", deps, re.M))
        src = crate_dir / "src"
        files = module_files(src)
        graph = {}
        for mod, f in files.items():
            text = re.sub(r"//.*", "", f.read_text())
            text = text.split("#[cfg(test)]")[0]
            edges = set()
            for kind, names in paths(text):
                if kind == "crate":
                    target = resolve(files, (), names)
                else:
                    parent = mod[:-1] if f.name not in ("mod.rs", "lib.rs") else mod[:-1]
                    target = resolve(files, parent, names)
                if target is not None and target != f and target != src / "lib.rs":
                    edges.add(target)
            graph[f] = edges
        for comp in strongly_connected(graph):
            circles.append([str(p.relative_to(ROOT)) for p in comp])
    crate_graph = {c: {d for d in deps if d in crates and d != c} for c, deps in crates.items()}
    for comp in strongly_connected(crate_graph):
        circles.append(comp)
    for c in circles:
        print("import circle:", " <-> ".join(c))
    if circles:
        return 1
    print(f"no import circles ({len(crates)} crates)")
    for c in sorted(crate_graph):
        print(f"  {c} -> {', '.join(sorted(crate_graph[c])) or '(none)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
