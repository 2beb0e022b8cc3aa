"""`/docs`: the API reference as one self-contained HTML page, rendered from the OpenAPI
schema on the server.

FastAPI's Swagger UI and ReDoc pages load their JavaScript and CSS from a CDN, so on an
air-gapped site they show a blank page. This page has no script and no external asset: each
operation with its parameters, request body and responses, and the schemas as JSON. The
machine-readable schema stays at `/openapi.json` for client generators."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse

METHODS = ("get", "post", "put", "patch", "delete")
STYLE = """
body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;
line-height:1.45;color:#1b1b1b}
h2{border-bottom:1px solid #ccc;margin-top:2.5rem}
.op{border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;margin:1rem 0}
.m{font-weight:bold;text-transform:uppercase;display:inline-block;min-width:4.5rem}
code,pre{font-family:ui-monospace,monospace;font-size:.9em}
pre{background:#f6f6f6;padding:.6rem;overflow:auto;max-height:24rem}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:.2rem .5rem;text-align:left}
"""


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref.rsplit("/", 1)[-1] if isinstance(ref, str) else None


def _schema_label(schema: dict[str, Any] | None) -> str:
    if not schema:
        return ""
    name = _ref_name(schema)
    if name:
        return f'<a href="#schema-{escape(name)}">{escape(name)}</a>'
    if "items" in schema:
        return f"array of {_schema_label(schema['items'])}"
    if "anyOf" in schema:
        return " | ".join(_schema_label(s) for s in schema["anyOf"])
    return escape(str(schema.get("type", "object")))


def _operation(method: str, path: str, op: dict[str, Any]) -> str:
    parts = [
        '<div class="op">',
        f'<span class="m">{escape(method)}</span> <code>{escape(path)}</code>',
        f"<p>{escape(op.get('summary', ''))}</p>",
    ]
    if description := op.get("description"):
        parts.append(f"<p>{escape(description)}</p>")
    if params := op.get("parameters"):
        rows = "".join(
            f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p['in'])}</td>"
            f"<td>{'yes' if p.get('required') else 'no'}</td>"
            f"<td>{_schema_label(p.get('schema'))}</td></tr>"
            for p in params
        )
        parts.append(
            "<table><tr><th>parameter</th><th>in</th><th>required</th><th>type</th></tr>"
            f"{rows}</table>"
        )
    if body := op.get("requestBody"):
        for media, content in body.get("content", {}).items():
            parts.append(
                f"<p>Request body ({escape(media)}): {_schema_label(content.get('schema'))}</p>"
            )
    items = []
    for status, response in op.get("responses", {}).items():
        labels = [
            f"{escape(media)} {_schema_label(content.get('schema'))}"
            for media, content in response.get("content", {}).items()
        ]
        items.append(
            f"<li><b>{escape(str(status))}</b> {escape(response.get('description', ''))}"
            f"{' — ' + ', '.join(labels) if labels else ''}</li>"
        )
    parts.append(f"<ul>{''.join(items)}</ul></div>")
    return "".join(parts)


def render_docs(schema: dict[str, Any]) -> str:
    info = schema.get("info", {})
    title = f"{info.get('title', 'API')} {info.get('version', '')}".strip()
    body = [
        f"<h1>{escape(title)}</h1>",
        f"<p>{escape(info.get('description', ''))}</p>",
        '<p>Machine-readable schema: <a href="/openapi.json">/openapi.json</a>. Every error '
        "is <code>application/problem+json</code> with a stable <code>code</code>.</p>",
        "<h2>Operations</h2>",
    ]
    for path, item in schema.get("paths", {}).items():
        for method in METHODS:
            if method in item:
                body.append(_operation(method, path, item[method]))
    body.append("<h2>Schemas</h2>")
    for name, definition in schema.get("components", {}).get("schemas", {}).items():
        body.append(
            f'<h3 id="schema-{escape(name)}">{escape(name)}</h3>'
            f"<pre>{escape(json.dumps(definition, indent=2))}</pre>"
        )
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{''.join(body)}</body></html>"
    )


def install_docs_page(app: FastAPI) -> None:
    @app.get("/docs", include_in_schema=False, response_class=HTMLResponse)
    async def docs(request: Request) -> HTMLResponse:
        return HTMLResponse(render_docs(request.app.openapi()))


def openapi_json(app: FastAPI) -> str:
    """The OpenAPI document as committed in docs/openapi.json: stable key order (the
    routes' own), two-space indent, a final newline, so a regenerated file diffs cleanly."""
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"
