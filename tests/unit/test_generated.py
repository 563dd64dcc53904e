"""Generated files are fresh: the align2.v1 stubs (`make protos`) and the configuration
doc (`make docs`)."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_are_fresh(tmp_path: pathlib.Path) -> None:
    fresh = _generator().generate(tmp_path)
    checked_in = ROOT / "client" / "align2" / "v1"
    names = sorted(p.name for p in fresh)
    assert names == sorted(p.name for p in checked_in.iterdir() if p.is_file()), (
        "stub files differ from a fresh generation: run `make protos`"
    )
    for path in fresh:
        assert path.read_bytes() == (checked_in / path.name).read_bytes(), (
            f"{path.name} is stale: run `make protos` and commit the result"
        )


def test_configuration_doc_is_fresh() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_config_docs", ROOT / "scripts" / "gen_config_docs.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (ROOT / "docs" / "configuration.md").read_text() == module.render(), (
        "docs/configuration.md is stale: run `make docs`"
    )
