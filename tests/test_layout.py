"""The layout's rules, checked on the source: imports run one way (scripts -> gfa.* -> model.py),
no script imports another script, no import circle among the shared modules, and nothing in
the repository refers to files outside it."""
import ast
import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ["train", "fanin", "prune", "bench", "resnet", "hf", "taper"]


def project_imports(path, scripts=SCRIPTS):
    """The project modules a file imports ('model', 'gfa.x', or a script's name), anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + ([f"gfa.{a.name}" for a in node.names] if node.module == "gfa" else [])
        out |= {n for n in names if n == "model" or n.startswith("gfa.") or n in scripts}
    return out - {"gfa"}


def test_imports_run_one_way():
    assert project_imports(os.path.join(ROOT, "model.py")) == set()   # the bottom: torch only
    shared = {os.path.splitext(os.path.basename(p))[0]: project_imports(p)
              for p in glob.glob(os.path.join(ROOT, "gfa", "*.py")) if not p.endswith("__init__.py")}
    for name, deps in shared.items():
        assert all(d == "model" or d.startswith("gfa.") for d in deps), (name, deps)   # never a script
    recipes = glob.glob(os.path.join(ROOT, "data", "**", "*.py"), recursive=True)
    scripts = ([os.path.join(ROOT, f"{s}.py") for s in SCRIPTS] + recipes
               + glob.glob(os.path.join(ROOT, "experiments", "**", "*.py"), recursive=True))
    names = set(SCRIPTS) | {os.path.splitext(os.path.basename(p))[0] for p in recipes}
    for path in scripts:
        deps = project_imports(path, names)
        assert not deps & names, (path, deps)   # no script imports another script
    # no circle among the shared modules: a topological order exists
    graph = {n: {d[4:] for d in deps if d.startswith("gfa.")} for n, deps in shared.items()}
    done = set()
    while graph.keys() - done:
        ready = [n for n in graph.keys() - done if graph[n] <= done]
        assert ready, f"import circle among {sorted(graph.keys() - done)}"
        done |= set(ready)


def test_nothing_refers_outside_the_repository():
    r = subprocess.run(["git", "grep", "-nE", r"\.\./shared|SPEC\.md", "--", ".", ":!tests/test_layout.py"],
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode == 128:
        pytest.skip("not a git checkout (an unpacked archive): no file list to search")
    assert r.stdout == "", r.stdout


# the tracked tree travels with every clone (and every GPU call, 64 MiB at most): results are kept as the
# summaries, dumps and logs that regenerate them, figures only where a page links them
TREE_BUDGET = 12_000_000          # bytes, every tracked file
FILE_LIMIT = 1_000_000            # bytes, any one file, unless listed here
LARGE_FILES = {"data/shakespeare/input.txt.xz"}   # the embedded demo corpus


def tracked_files():
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout (an unpacked archive): no file list")
    return [f for f in r.stdout.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))]


def test_the_tracked_tree_stays_lean():
    sizes = {f: os.path.getsize(os.path.join(ROOT, f)) for f in tracked_files()}
    large = sorted(f for f, n in sizes.items() if n > FILE_LIMIT and f not in LARGE_FILES)
    assert not large, f"files over {FILE_LIMIT:,} bytes (list them in LARGE_FILES with a reason, or shrink them): {large}"
    total = sum(sizes.values())
    biggest = sorted(sizes, key=sizes.get)[-5:]
    assert total <= TREE_BUDGET, f"tracked tree {total:,} bytes > {TREE_BUDGET:,}; largest: {biggest}"


def test_no_code_under_docs():
    code = [f for f in tracked_files() if f.startswith("docs/") and f.endswith((".py", ".sh"))]
    assert not code, f"study code belongs in experiments/<study>/, not docs/: {code}"
