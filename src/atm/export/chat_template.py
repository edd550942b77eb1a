"""Chat templates (Jinja) as GGUF readers and Ollama see them: cleaning and rendering.

``export/gguf.py`` (conversion, tokenizer checks) and ``export/modelfile.py`` (translation to an
Ollama Go template) both render a model's chat template; they share this module instead of
importing each other.
"""

from __future__ import annotations

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
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str):
        raise AtmError(f"chat template raised: {msg}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            bos_token=bos_token, eos_token=eos_token)
