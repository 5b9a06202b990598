"""The structural facts of a report page, for comparing two renderings: every heading, table
cell (with its row's and its own class), caption, paragraph and list item, in page order."""

from __future__ import annotations

from html.parser import HTMLParser

FACT_TAGS = ("title", "h1", "h2", "h3", "h4", "th", "td", "figcaption", "p", "li", "summary")


class _Facts(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.facts: list[str] = []
        self.stack: list[tuple[str, str]] = []  # open fact tags: (label, text so far)
        self.row_class = ""
        self.images = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images += 1
            self.facts.append(f"img alt={a.get('alt')}")
        if tag == "tr":
            self.row_class = a.get("class") or ""
        if tag in FACT_TAGS:
            extra = f".{a['class']}" if a.get("class") else ""
            extra += f"[{a['data-value']}]" if "data-value" in a else ""
            row = f"tr.{self.row_class}>" if tag == "td" and self.row_class else ""
            self.stack.append((f"{row}{tag}{extra}", ""))
        if tag == "section":
            self.facts.append(f"section#{a.get('id')}")

    def handle_endtag(self, tag):
        if tag in FACT_TAGS and self.stack:
            label, text = self.stack.pop()
            self.facts.append(f"{label}: {' '.join(text.split())}")

    def handle_data(self, data):
        if self.stack:
            label, text = self.stack[-1]
            self.stack[-1] = (label, text + data)
            for i in range(len(self.stack) - 1):  # nested facts (p in li) keep their text too
                lab, t = self.stack[i]
                self.stack[i] = (lab, t + data)


def page_facts(page: str) -> list[str]:
    parser = _Facts()
    parser.feed(page)
    return parser.facts
