"""Chat templates: the ``chat_template`` config key (CONFIG.md) as a built-in name, ``auto``
(the most common template among the inputs), or literal Jinja; written where transformers
reads it (``chat_template.jinja``, and ``tokenizer_config.json``)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from .errors import ConfigError

__all__ = ["BUILT_IN", "check_template", "resolve_template"]

# Each writes the prompt of its format for system, user and assistant turns, then (with
# add_generation_prompt) the opening of the assistant's turn.
BUILT_IN = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if not loop.first %}{{ '\\n\\n' }}{% endif %}"
        "{% if message['role'] == 'system' %}{{ message['content'] | trim }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}{{ '### Input:\\n' + message['content'] | trim }}"
        "{% else %}{{ '### Response:\\n' + message['content'] | trim }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '\\n\\n### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}"
        "{{ '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    "exaone": (
        "{% if messages[0]['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def check_template(value: object) -> str:
    """The ``chat_template`` value, checked: a built-in name, ``auto``, or Jinja (a string
    with ``{{`` or ``{%``)."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"chat_template: expected a template name or Jinja text, got {value!r}")
    if value in BUILT_IN or value == "auto" or "{{" in value or "{%" in value:
        return value
    names = ", ".join([*BUILT_IN, "auto"])
    raise ConfigError(f"chat_template: unknown template {value!r} (built in: {names}; or Jinja text)")


def _template_of(folder: Path) -> str | None:
    """A model folder's chat template: ``chat_template.jinja``, else its tokenizer config's
    (the ``default`` one of a list)."""
    f = folder / "chat_template.jinja"
    if f.is_file():
        return f.read_text(encoding="utf-8").strip() or None
    try:
        tk = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    t = tk.get("chat_template") if isinstance(tk, dict) else None
    if isinstance(t, list):
        t = next((e.get("template") for e in t if isinstance(e, dict) and e.get("name") == "default"), None)
    return t.strip() if isinstance(t, str) and t.strip() else None


def resolve_template(value: str | None, folders: Iterable[Path]) -> tuple[str | None, list[str]]:
    """The Jinja text ``value`` names (``auto``: the most common template among ``folders``,
    the first seen on a tie), and warnings."""
    if value is None:
        return None, []
    if value == "auto":
        found = [t for f in dict.fromkeys(folders) if (t := _template_of(f)) is not None]
        if not found:
            return None, ["chat_template: auto found no chat template among the inputs; none written"]
        return Counter(found).most_common(1)[0][0], []
    return BUILT_IN.get(value, value), []
