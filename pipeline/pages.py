"""The HTML pages the pipeline writes (the quickstart report, an attribution run's index.html): one frame
and base stylesheet, and pictures embedded as data URIs (:func:`png_img`) where a page must open anywhere
without its folder."""

from __future__ import annotations

import base64
import html

_BASE_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1400px}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
    "code{background:#f4f4f4;padding:1px 4px}"
)


def page(title: str, body: str, style: str = "") -> str:
    """A whole HTML document: ``title`` (escaped here), ``body`` (HTML) and ``style`` added to the base
    stylesheet."""
    return (
        f'<!doctype html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_BASE_STYLE}{style}</style></head><body>\n{body}\n</body></html>\n"
    )


def png_img(data: bytes, alt: str, width: str = "100%") -> str:
    """An ``<img>`` holding the PNG bytes ``data`` itself."""
    return (
        f"<img alt='{html.escape(alt)}' style='max-width:{width}' "
        f"src='data:image/png;base64,{base64.b64encode(data).decode()}'>"
    )
