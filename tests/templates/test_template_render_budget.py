"""A chat template is the checkpoint author's code: every render runs on a time and size budget."""

from __future__ import annotations

import time

import pytest

from healer.templates.render import MAX_OUTPUT_CHARS, RENDER_SECONDS, TemplateError, render_source

MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("source, reason", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "longer than"),
    ("{% set s = 'ab' * 50000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "longer than"),
    ("{{ 'x' * 10000000000 }}", "str * 10000000000"),
    ("{% set n = 100000 %}{{ ('x' * n) * n }}", "str * 100000"),
    ("{% set s = 'x' * 9000000 %}{{ s + s }}", "concatenation"),
    ("{{ 'x'.center(10000000000) }}", "center()"),
    ("{{ 10 ** 1000000000 }}", "too large a number"),
    ("{% for i in range(3000) %}{{ 'x' * 9999 }}{% endfor %}", "output passed"),
    ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "recursion"),
], ids=["nested-range", "nested-string-loops", "huge-repeat", "repeat-of-repeat", "huge-concat", "center",
        "power", "output-size", "recursion"])
def test_a_template_over_budget_is_a_template_error_not_a_hang(source, reason):
    started = time.monotonic()
    with pytest.raises(TemplateError, match="cannot render this conversation") as e:
        render_source(source, MESSAGES)
    assert reason in str(e.value)
    assert time.monotonic() - started < RENDER_SECONDS + 2


def test_ranges_inside_the_budget_behave_like_python_ranges():
    source = ("{{ range(3)|list }} {{ range(5)|reverse|list }} {{ range(4)|length }} {{ range(2, 9, 3)[1] }} "
              "{% for i in range(3) %}{{ loop.length }}{% endfor %} {{ 'ab' * 3 }} {{ 2 ** 10 }}")
    assert render_source(source, MESSAGES) == "[0, 1, 2] [4, 3, 2, 1, 0] 4 5 333 ababab 1024"


def test_the_budget_ends_with_the_render():
    import sys

    tracer = sys.gettrace()
    render_source("{{ messages[0].content }}", MESSAGES)
    assert sys.gettrace() is tracer
    assert len(render_source("{{ 'x' * n }}", MESSAGES, n=MAX_OUTPUT_CHARS)) == MAX_OUTPUT_CHARS
