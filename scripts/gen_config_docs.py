"""Write docs/configuration.md from align2.server.config (`make docs`; a test checks it).

Keys, types and defaults come from the dataclasses themselves, explanations from the
docstring under each field, so the document cannot drift from the code.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import pathlib
import sys
import typing
from typing import Any

from align2.server import config as config_module

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "configuration.md"

HEADER = """# Configuration

`align2 serve --config FILE` reads a TOML file; every key has a default (an empty file, or
none, serves the embedded default models), unknown keys and wrong types are refused at
start with the key named. Flags override the file: `--host`, `--port`, `--metrics-port`,
`--metrics-host`, `--cache-dir` (or `ALIGN2_CACHE_DIR`), `--log-level`, `--log-format`,
`--auth-tokens-file`, `--tls-cert-file`, `--tls-key-file`, `--tls-client-ca-file`.

Models are named tables, `[models.NAME]`; the defaults are `question` and `answer` (the
embedded reward models: `path = "{path}"`, `adapter =
"{question_adapter}"` or `"{answer_adapter}"`, `vision_tower =
"{tower}"`, `share_base = {share}`) and `llm` (the embedded SmolLM2). Setting
`[models]` in a file replaces the defaults as a whole; the table below gives the default
of each key in a model you write (`path` is required).

This file is generated from `server/align2/server/config.py` by
`python scripts/gen_config_docs.py`.
"""


def field_docs(cls: type) -> dict[str, str]:
    """The string literal under each annotated field of a dataclass, by field name."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        documented = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and documented:
            docs[node.target.id] = " ".join(str(after.value.value).split())  # type: ignore[union-attr]
    return docs


def default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if value is None:
        return "unset"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def table(prefix: str, cls: type, instance: Any) -> list[str]:
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    rows = [
        f"## `[{prefix}]`",
        "",
        (cls.__doc__ or "").strip(),
        "",
        "| key | default | meaning |",
        "| --- | --- | --- |",
    ]
    nested = []
    for f in dataclasses.fields(cls):
        value = getattr(instance, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f"{prefix}.{f.name}", type(value), value))
            continue
        hint = hints[f.name]
        if typing.get_origin(hint) is typing.Literal:
            kind = " \\| ".join(typing.get_args(hint))
        else:
            kind = getattr(hint, "__name__", str(hint)).replace(" | ", " or ")
        meaning = docs.get(f.name, "").replace("|", "\\|")
        rows.append(f"| `{f.name}` ({kind}) | {default_text(value)} | {meaning} |")
    rows.append("")
    for args in nested:
        rows += table(*args)
    return rows


def render() -> str:
    config = config_module.Config()
    question, answer = config.models["question"], config.models["answer"]
    header = HEADER.format(
        path=question.path,
        question_adapter=question.adapter,
        answer_adapter=answer.adapter,
        tower=question.vision_tower,
        share=str(question.share_base).lower(),
    )
    lines = [header]
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "models":
            lines += table("models.NAME", config_module.ModelConfig, config_module.ModelConfig(""))
        else:
            lines += table(f.name, type(value), value)
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(OUT.relative_to(ROOT), file=sys.stderr)
