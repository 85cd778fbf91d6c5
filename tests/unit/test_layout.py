"""House rules that the layout depends on (see DESIGN.md)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_source_folders_have_no_init_that_would_shadow_the_stdlib():
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (ROOT / "models" / "__init__.py").exists()


def test_model_code_never_imports_the_platform_or_its_engines():
    pattern = re.compile(r"^\s*(import|from)\s+(ray|mlflow|deepspeed|shipyard)(\.|\s|$)", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "models").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_registry_is_one_explicit_dict_of_families():
    from shipyard.registry import MODELS
    from shipyard_models.family import Family
    assert MODELS and all(isinstance(f, Family) and f.name == k for k, f in MODELS.items())
