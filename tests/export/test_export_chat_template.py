"""Chat template helpers: dates pinned so every engine and every day renders one prompt."""

from __future__ import annotations

import datetime as dt

import pytest

from atm.export.chat_template import PINNED_DATE, pin_template_dates


def _hf(template: str, messages, **kw) -> str:
    """transformers' own renderer (with its real clock, ``strftime_now``)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template,
                                        add_generation_prompt=True, **kw)
    return rendered[0]


@pytest.fixture(scope="module")
def llama32_template() -> str:
    """Meta's official template, from the llama.cpp source ATM fetches (``atm doctor --build``)."""
    from atm.export.llamacpp import llamacpp_source

    return (llamacpp_source() / "models" / "templates" / "meta-llama-Llama-3.2-3B-Instruct.jinja").read_text()


def test_llama32_date_is_pinned(llama32_template):
    msgs = [{"role": "user", "content": "hi"}]
    today = dt.datetime.now().strftime("%d %b %Y")
    # unpinned, transformers writes today's date into every prompt
    assert f"Today Date: {today}\n" in _hf(llama32_template, msgs, bos_token="<|begin_of_text|>")
    pinned = pin_template_dates(llama32_template)
    assert pinned.endswith(llama32_template)
    out = _hf(pinned, msgs, bos_token="<|begin_of_text|>")
    assert "Today Date: 26 Jul 2024\n" in out and PINNED_DATE == dt.date(2024, 7, 26)
    # nothing else changes: the pinned prompt is the template's own fallback rendering
    assert out == _hf(llama32_template, msgs, bos_token="<|begin_of_text|>", date_string="26 Jul 2024")
    assert pin_template_dates(pinned) == pinned  # idempotent


def test_direct_clock_calls_are_pinned_and_other_templates_unchanged():
    tpl = '{{ "D=" + strftime_now("%A %-d %B %Y, %F %H:%M") }}{{ messages[0].content }}'
    assert _hf(pin_template_dates(tpl), [{"role": "user", "content": "x"}]) == \
        "D=Friday 26 July 2024, 2024-07-26 00:00x"
    assert _hf(pin_template_dates(tpl, dt.date(2025, 1, 2)), [{"role": "user", "content": "x"}]) == \
        "D=Thursday 2 January 2025, 2025-01-02 00:00x"
    plain = "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert pin_template_dates(plain) is plain
