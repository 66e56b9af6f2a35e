"""Griffe extension: render the reStructuredText bits of our Google-style docstrings as Markdown.

The docstrings are written for Sphinx-style readers (``:class:`~lightning_reg.X``` roles, ``.. math::``
directives, ``Text::`` literal blocks and simple ``====`` tables). mkdocstrings renders Markdown, so before
griffe parses a docstring this extension rewrites:

* ``:class:/:func:/:meth:/:attr:/:mod:/:data:/:exc:/:obj:`` roles to cross-references
  (``[`X`][lightning_reg.X]``) for ``lightning_reg`` targets, which the strict docs build checks, and to
  inline code otherwise; a leading ``~`` shows the last name only;
* ``:math:`x``` to inline code, and ``.. math::`` blocks to ``latex`` code blocks (no JavaScript needed);
* ``.. code-block:: lang`` to a fenced code block;
* ``Text::`` followed by an indented block to ``Text:`` and a code block;
* simple reST tables (``===  ===`` rules) to Markdown tables;
* grouped parameters (``a, b, c: text`` in ``Args:``, which Google style does not allow) to one entry per name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|mod|data|exc|obj):`(~?)([^`<>]+?)`")
_MATH_ROLE = re.compile(r":math:`([^`]+)`")
_MULTILINE_MATH = re.compile(r":math:`([^`]+)`", re.S)
_RULE = re.compile(r"^(\s*)(=+)((?:\s+=+)+)\s*$")


Resolver = Callable[[str], "tuple[str, bool] | None"]


def _no_resolver(target: str) -> tuple[str, bool] | None:
    return target, True


def _role(match: re.Match[str], resolve: Resolver = _no_resolver) -> str:
    _, short, target = match.groups()
    target = target.strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    if not (target.startswith("lightning_reg.") or target == "lightning_reg"):
        return f"`{shown}`"
    found = resolve(target)
    if found is None:  # no such object: keep the reference, so the strict build reports it
        return f"[`{shown}`][{target}]"
    path, rendered = found
    return f"[`{shown}`][{path}]" if rendered else f"`{shown}`"


def _math_role(match: re.Match[str]) -> str:
    body = match.group(1).replace("`", "'")
    return f"`{body}`"


def _inline(line: str, resolve: Resolver = _no_resolver) -> str:
    return _MATH_ROLE.sub(_math_role, _ROLE.sub(lambda m: _role(m, resolve), line))


def _cuts(line: str, starts: list[int]) -> list[int]:
    """Column starts for ``line``: a cell that overflows into the next column pushes that column's start right."""
    cuts = [starts[0]]
    for s in starts[1:]:
        s = max(s, cuts[-1])
        if 0 < s < len(line) and line[s - 1] != " ":
            gap = line.find("  ", s)
            s = len(line) if gap < 0 else len(line) - len(line[gap:].lstrip(" "))
        cuts.append(s)
    return cuts


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block(lines: list[str], start: int, base: int) -> tuple[list[str], int]:
    """The lines indented deeper than ``base`` from ``start`` on (blank lines inside kept), and the next index."""
    out: list[str] = []
    i = start
    while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > base):
        out.append(lines[i])
        i += 1
    while out and not out[-1].strip():
        out.pop()
        i -= 1
    return out, i


def _fence(body: list[str], indent: str, lang: str) -> list[str]:
    while body and not body[0].strip():
        body = body[1:]
    depth = min((_indent(line) for line in body if line.strip()), default=0)
    return [f"{indent}```{lang}", *(indent + line[depth:] if line.strip() else "" for line in body), f"{indent}```"]


def _table(lines: list[str], start: int) -> tuple[list[str], int] | None:
    """A simple reST table ``=== ===`` / rows / ``=== ===`` (optionally with a header) as a Markdown table."""
    rule = _RULE.match(lines[start])
    if rule is None:
        return None
    indent = rule.group(1)
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", lines[start])]
    rows: list[list[str]] = []
    i = start + 1
    rules = 1
    header: list[str] | None = None
    while i < len(lines):
        line = lines[i]
        if _RULE.match(line):
            rules += 1
            i += 1
            if rules == 2 and i < len(lines) and lines[i].strip() and not _RULE.match(lines[i]):
                header_rows, rows = rows, []
                header = [" ".join(parts) for parts in zip(*header_rows)] if header_rows else None
                continue
            break
        if not line.strip():
            i += 1
            continue
        cuts = _cuts(line, [s for s, _ in spans])
        cells = [line[c : (cuts[k + 1] if k + 1 < len(cuts) else len(line))].strip() for k, c in enumerate(cuts)]
        if rows and not cells[0]:  # continuation of the previous row
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
        i += 1
    if rules < 2:
        return None
    if header is None:
        header = rows[0] if len(rows) == 1 else ["", *[""] * (len(spans) - 1)]
        body = rows if len(rows) != 1 else []
        if not any(header):
            header = ["name", "meaning"] if len(spans) == 2 else [""] * len(spans)
    else:
        body = rows
    out = [indent + "| " + " | ".join(header) + " |", indent + "|" + "---|" * len(spans)]
    out += [indent + "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    return out, i


_SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
_GROUP = re.compile(r"^(\s*)([\w*]+(?:\s*,\s*[\w*]+)+)\s*:(.*)$")


def _split_grouped_params(lines: list[str]) -> list[str]:
    """``a, b, c: text`` in an ``Args:`` section (names may wrap) becomes one ``name: text`` entry per name."""
    out: list[str] = []
    section: int | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        header = _SECTION.match(line)
        if header:
            section = len(header.group(1))
            out.append(line)
            i += 1
            continue
        if section is not None and line.strip() and _indent(line) <= section:
            section = None
        if section is not None and line.strip() and line.rstrip().endswith(","):
            item = line.rstrip()
            while item.endswith(",") and i + 1 < len(lines) and lines[i + 1].strip():
                i += 1
                item += " " + lines[i].strip()
            line = item
        group = _GROUP.match(line) if section is not None else None
        if group is None:
            out.append(line)
            i += 1
            continue
        indent, names, desc = group.groups()
        body, i = _block(lines, i + 1, len(indent))
        for name in (n.strip() for n in names.split(",")):
            out += [f"{indent}{name}:{desc}", *body]
    return out


_EXAMPLE = re.compile(r"^(\s*)Example:\s*$")


def rst_to_markdown(text: str, resolve: Resolver = _no_resolver) -> str:
    """Rewrite the reST constructs of a docstring as Markdown (see the module docstring).

    ``resolve(target)`` maps a ``lightning_reg`` role target to ``(identifier, rendered)``: the path the API
    reference documents it under and whether it is rendered there, or ``None`` if no such object exists.
    """
    text = text.replace("``\\ ", "``")
    text = _MULTILINE_MATH.sub(lambda m: _math_role(m) if "\n" in m.group(1) else m.group(0), text)
    lines = [_EXAMPLE.sub(r"\1Examples:", line) for line in _split_grouped_params(text.splitlines())]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        ind = " " * _indent(line)
        if stripped.startswith(".. math::"):
            first = stripped[len(".. math::") :].strip()
            body, i = _block(lines, i + 1, _indent(line))
            math = ([ind + "    " + first] if first else []) + body
            out += ["", *_fence([_MATH_ROLE.sub(r"\1", m) for m in math], ind, "latex"), ""]
            continue
        if stripped.startswith((".. code-block::", ".. code::")):
            lang = stripped.split("::", 1)[1].strip() or "text"
            body, i = _block(lines, i + 1, _indent(line))
            out += ["", *_fence(body, ind, lang), ""]
            continue
        if stripped.endswith("::") and not stripped.startswith(".."):
            nxt = i + 1
            while nxt < len(lines) and not lines[nxt].strip():
                nxt += 1
            if nxt < len(lines) and _indent(lines[nxt]) > _indent(line):
                body, i = _block(lines, i + 1, _indent(line))
                label = stripped[:-2].rstrip()
                lang = "yaml" if label.lower().startswith("yaml") else ("text" if label else "python")
                if label:
                    out.append(ind + label + ":")
                out += ["", *_fence(body, ind, lang), ""]
                continue
        if _RULE.match(line):
            table = _table(lines, i)
            if table is not None:
                rows, i = table
                out += ["", *(_inline(r, resolve) for r in rows), ""]
                continue
        out.append(_inline(line, resolve))
        i += 1
    return "\n".join(out)


#: Modules the API reference does not render (private helpers, the CLI, the test kit has its own page).
_NOT_RENDERED = ("lightning_reg.cli", "lightning_reg.testing", "lightning_reg.core.summary")


def _is_rendered(obj: griffe.Object) -> bool:
    parts = obj.path.split(".")
    if any(p.startswith("_") for p in parts) or obj.path.startswith(_NOT_RENDERED):
        return False
    return obj.is_module or bool(obj.docstring)


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring of a package with :func:`rst_to_markdown` once the whole package is loaded.

    Role targets are resolved through the package's aliases (``lightning_reg.EMATeacher`` is documented as
    ``lightning_reg.callbacks.ema.EMATeacher``); a target that does not exist stays a cross-reference, which the
    strict build reports; one that exists but is not rendered (no docstring, private) becomes inline code.
    """

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        collection = pkg.modules_collection

        def resolve(target: str) -> tuple[str, bool] | None:
            try:
                obj = collection[target]
                final = obj.final_target if obj.is_alias else obj
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                return None
            return final.path, _is_rendered(final)

        seen: set[str] = set()

        def visit(obj: griffe.Object) -> None:
            if obj.path in seen:
                return
            seen.add(obj.path)
            if obj.docstring is not None:
                obj.docstring.value = rst_to_markdown(obj.docstring.value, resolve)
            for member in obj.members.values():
                if not member.is_alias:
                    visit(member)  # type: ignore[arg-type]

        visit(pkg)
