"""The documentation of every config key, read from the comments beside its assignment in
`sft_jax.config_defaults.defaults()`, so that the defaults and their documentation stay one source: a comment
block directly above an assignment and the comment on its line(s) document that key. `sft-jax train --help`
prints them (`config_help`); tests/test_cli.py requires one for every key.
"""

from __future__ import annotations

import ast
import functools
import io
import textwrap
import tokenize

import ml_collections

from sft_jax import config_defaults


@functools.cache
def key_docs() -> dict[str, str]:
    """{dotted key: its documentation} for every key assigned in defaults(), sections (ConfigDicts) included;
    a key with no comment maps to ""."""
    with open(config_defaults.__file__, encoding="utf-8") as f:
        source = f.read()
    comments: dict[int, str] = {}  # line -> comment text
    whole_line: set[int] = set()  # lines holding only a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[: tok.start[1]].strip():
                whole_line.add(tok.start[0])
    function = next(node for node in ast.parse(source).body
                    if isinstance(node, ast.FunctionDef) and node.name == "defaults")
    docs = {}
    for stmt in function.body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and (key := _dotted(stmt.targets[0]))):
            continue
        above = []
        line = stmt.lineno - 1
        while line in whole_line:
            above.insert(0, comments[line])
            line -= 1
        beside = [comments[i] for i in range(stmt.lineno, stmt.end_lineno + 1) if i in comments]
        docs[key] = " ".join(above + beside)
    return docs


def _dotted(target: ast.expr) -> str | None:
    """"lora.rank" for the target `c.lora.rank`; None for anything else."""
    parts = []
    while isinstance(target, ast.Attribute):
        parts.insert(0, target.attr)
        target = target.value
    return ".".join(parts) if isinstance(target, ast.Name) and target.id == "c" and parts else None


def leaf_keys(config: ml_collections.ConfigDict | None = None, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, default) of every value of `config` (defaults() when None) that is not a section, in order."""
    config = config_defaults.defaults() if config is None else config
    out = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out += leaf_keys(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def config_help(width: int = 100) -> str:
    """Every config key, in the order of defaults(), with its default and documentation; the keys of a section
    under the section's documentation."""
    docs = key_docs()
    leaves = dict(leaf_keys())
    order = [k for k in docs if k in leaves] + [k for k in leaves if k not in docs]
    lines = ["Config keys (override with --config.KEY=VALUE; shown with the library default, which a --config "
             "file may change):"]
    section = None
    for key in order:
        parent = key.rsplit(".", 1)[0] if "." in key else None
        if parent != section:
            section = parent
            lines.append("")
            if parent is not None:
                lines += textwrap.wrap(f"{parent}.*" + (f": {docs[parent]}" if docs.get(parent) else ""), width,
                                       initial_indent="  ", subsequent_indent="      ")
        lines.append(f"  --config.{key}={leaves[key]!r}")
        lines += textwrap.wrap(docs.get(key, ""), width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)
