"""Chat templates (Jinja) as GGUF readers and Ollama see them: cleaning and rendering.

``export/gguf.py`` (conversion, tokenizer checks) and ``export/modelfile.py`` (translation to an
Ollama Go template) both render a model's chat template; they share this module instead of
importing each other.

A template that reads the clock (Llama 3.x's ``strftime_now("%d %b %Y")`` for "Today Date") would
render different prompts on different days and in different engines (transformers and llama.cpp
call the clock; Ollama's Go TEMPLATE is fixed text). ATM pins such dates with
:func:`pin_template_dates` when it writes a model dir, so training, llama-server, the transformers
engine and the Modelfile all see one prompt.
"""

from __future__ import annotations

import datetime as _dt
import functools

from atm.errors import AtmError

# transformers' assistant-mask markers: not standard Jinja (see export/gguf.py:_stage_model_dir)
STRIP_TEMPLATE_TAGS = ("{% generation %}", "{% endgeneration %}", "{%- generation %}",
                       "{%- endgeneration %}", "{% generation -%}", "{% endgeneration -%}")


def clean_chat_template(text: str) -> str:
    """The template without transformers' ``{% generation %}`` markers (same rendered text)."""
    for tag in STRIP_TEMPLATE_TAGS:
        text = text.replace(tag, "")
    return text


def render_jinja(template: str, messages: list[dict[str, str]], add_generation_prompt: bool,
                 bos_token: str, eos_token: str) -> str:
    """Render a chat template with the settings transformers and llama-cpp-python use."""
    return _compiled(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token)


@functools.lru_cache(maxsize=32)
def _compiled(template: str):
    """A compiled template (probing one renders it dozens of times; the environment is immutable)."""
    return _sandbox().from_string(template)


def _sandbox(**globals_):
    """The Jinja environment transformers and llama-cpp-python render chat templates in."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise AtmError(f"chat template raised: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals.update(globals_)
    return env


# The date Meta's own Llama 3.x templates fall back to when no clock is available.
PINNED_DATE = _dt.date(2024, 7, 26)
# strftime codes a template may ask for, longest first (``%-d`` before ``%d``); times are 00:00:00.
_STRFTIME_CODES = ("%-d", "%-m", "%-H", "%-M", "%-S", "%-j", "%d", "%m", "%y", "%Y", "%b", "%B", "%a",
                   "%A", "%j", "%H", "%M", "%S", "%I", "%p", "%e", "%F", "%D", "%Z", "%z")
_PIN_MARK = "{#- atm: dates pinned #}"


def _strftime(date: _dt.date, code: str) -> str:
    d = _dt.datetime(date.year, date.month, date.day)
    if code.startswith("%-"):  # glibc's "no padding" flag; not portable through datetime.strftime
        return str(int(d.strftime("%" + code[2:])))
    if code == "%e":
        return f"{d.day:>2}"
    if code in ("%Z", "%z"):
        return ""
    return d.strftime(code)


def pin_template_dates(template: str, date: _dt.date = PINNED_DATE) -> str:
    """``template`` with its clock reads replaced by a fixed ``date`` (idempotent).

    Templates that do not mention ``strftime_now`` come back unchanged. Otherwise
    ``{%- set date_string = "26 Jul 2024" %}`` goes in front: Llama 3.x templates take that variable
    instead of the clock when it is defined. If the clock still shows through (a template that
    calls ``strftime_now`` directly), a ``strftime_now(format)`` macro that formats ``date`` goes in
    front too and shadows the engine's clock. Checked by rendering with two different clocks.
    """
    if "strftime_now" not in template or template.startswith(_PIN_MARK):
        return template
    date_string = _strftime(date, "%d") + " " + _strftime(date, "%b") + " " + _strftime(date, "%Y")
    pinned = _PIN_MARK + f'{{%- set date_string = "{date_string}" %}}' + template
    if _clock_free(pinned):
        return pinned
    fmt = "format"
    for code in _STRFTIME_CODES:
        fmt += f"|replace({code!r}, {_strftime(date, code)!r})"
    return (_PIN_MARK + f'{{%- set date_string = "{date_string}" %}}'
            f"{{%- macro strftime_now(format) %}}{{{{ {fmt} }}}}{{%- endmacro %}}" + template)


def _clock_free(template: str) -> bool:
    """Whether ``template`` renders the same under two different clocks (a user turn, generation
    prompt on). A template that cannot render one user turn counts as not clock-free."""
    outs = set()
    for clock in (_dt.datetime(1999, 2, 3, 4, 5, 6), _dt.datetime(2031, 11, 27, 13, 14, 15)):
        try:
            outs.add(_sandbox(strftime_now=lambda f, c=clock: c.strftime(f)).from_string(template).render(
                messages=[{"role": "user", "content": "x"}], add_generation_prompt=True,
                bos_token="", eos_token=""))
        except Exception:  # noqa: BLE001 - arbitrary templates: pin with the macro as well
            return False
    return len(outs) == 1
