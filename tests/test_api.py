"""The flat public API: every exported name exists and every public function and class is documented."""

import inspect

import pytest

import rpg

MODULES = [rpg.kl, rpg.objectives, rpg.clipping, rpg.aggregation, rpg.advantages, rpg.logprobs,
           rpg.presets, rpg.metrics, rpg.testing]


def test_all_names_exist():
    missing = [name for name in rpg.__all__ if not hasattr(rpg, name)]
    assert not missing


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_public_objects_have_docstrings(module):
    assert module.__doc__ and len(module.__doc__) > 200
    undocumented = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name)
        if (inspect.isfunction(obj) or inspect.isclass(obj)) and not (obj.__doc__ or "").strip():
            undocumented.append(name)
    assert not undocumented, f"{module.__name__}: {undocumented}"


def test_core_import_pulls_no_integration():
    """A fresh `import rpg` loads no trainer framework (they are extras, imported only by integrations)."""
    import subprocess
    import sys

    code = "import rpg, sys; print(sorted({m.split('.')[0] for m in sys.modules} & {'verl', 'trl', 'transformers', 'ray'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
