"""Regression tests (issue 16): chat templates render with limits on time, memory, loop ranges and output, and any
failure is one FuselmError naming the template's source. Ordinary templates render exactly as transformers'
apply_chat_template does (the reference)."""

from __future__ import annotations

import time

import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from fuselm.errors import FuselmError
from fuselm.generation.chat import BUILTIN, render
from fuselm.generation.template_sandbox import TemplateLimits

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there  "},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Draw a red circle."}]

# A template in the style of published HF ones: namespace, loop variables, filters, raise_exception, slicing.
RICH = """{%- set ns = namespace(system='') -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}{%- endif -%}
{{ bos_token }}{% if ns.system %}[SYS]{{ ns.system | trim }}[/SYS]{% endif %}
{%- for m in messages if m['role'] != 'system' -%}
  {%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) -%}{{ raise_exception('roles must alternate') }}{%- endif -%}
  {{ '<' ~ m['role'] | upper ~ '>' }}{{ m['content'] | trim | replace('circle', 'disc') }}{{ eos_token }}
  {%- if loop.last and m['role'] == 'user' %} ({{ loop.length }} turns, {{ m['content'][:4] }}){% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}<ASSISTANT>{%- endif -%}
{{ ' ' ~ (messages | map(attribute='role') | join(',')) }} {{ '%-6s|' % 'x' }}{{ '{:>4}'.format(7) }}"""


def _hf_render(template: str, messages: list[dict]) -> str:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<s>": 0, "</s>": 1}, unk_token="<s>")),
                                  bos_token="<s>", eos_token="</s>")
    return tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", [*BUILTIN, "rich"])
def test_renders_as_transformers_does(name):
    template = RICH if name == "rich" else BUILTIN[name].source
    assert render(template, MESSAGES, bos_token="<s>", eos_token="</s>") == _hf_render(template, MESSAGES)


@pytest.mark.parametrize("template,message", [
    ("{% for i in range(10**9) %}x{% endfor %}", r"range\(\) of 1000000000 items"),
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", r"longer than 0\.5 s"),
    ("{% set l = range(50000)|list %}{% for i in l %}{% for j in l %}{% endfor %}{% endfor %}", r"longer than 0\.5 s"),
    ("{{ 'x' * 10**10 }}", r"'\*' would make 10000000000"),
    ("{{ [0] * 10**10 }}", r"'\*' would make 10000000000"),
    ("{{ 7 ** (10 ** 8) }}", r"too large a number"),  # jinja's ** is left-associative: 7 ** 10 ** 8 is 7 ** 80
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
     r"'~' would make"),
    ("{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
     r"'\+' would make"),
    ("{% set ns = namespace(s='xx') %}{% for i in range(64) %}{% set ns.s = ns.s|replace('x','xx') %}{% endfor %}",
     r"replace would make"),
    ("{{ (['x' * 1000000] * 1000) | join }}", r"join would make"),
    ("{{ 'x'|center(10**10) }}{{ 'x'.ljust(10**10) }}", r"center would make"),
    ("{{ '{:>10000000000}'.format('x') }}", r"format width would make"),
    ("{{ '{:{}}'.format('x', 10**10) }}", r"format width would make"),
    ("{{ '%10000000000s' % 'x' }}", r"'%' format width is too large"),
    ("{{ [1]|batch(10**9, 'x')|list }}", r"batch of 1000000000"),
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", r"output longer than"),
    ("{{ messages.__class__.__mro__ }}", r"SecurityError: access to attribute '__class__'"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", r"SecurityError"),
    ("{{ cycler.__init__.__globals__ }}", r"SecurityError"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", r"nests or recurses too deeply"),
    ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", r"nests or recurses too deeply"),
    ("{% for %}", r"syntax error at line 1"),
    ("{{ raise_exception('only user turns') }}", r"refused these messages: only user turns"),
    ("{{ 1 / 0 }}", r"ZeroDivisionError"),
    ("{% include 'other.jinja' %}", r"TemplateNotFound|no loader"),
])
def test_hostile_templates(template, message):
    start = time.monotonic()
    with pytest.raises(FuselmError, match=rf"tokenizer_config\.json: key 'chat_template': .*{message}"):
        render(template, MESSAGES, source="tokenizer_config.json: key 'chat_template'",
               limits=TemplateLimits(seconds=0.5))
    assert time.monotonic() - start < 10


def test_long_conversations_fit():
    """The limits grow with the conversation: a 6 MB document renders."""
    doc = [{"role": "user", "content": "word " * 1_200_000}]
    assert len(render(BUILTIN["llama3"].source, doc)) > 6_000_000


def test_non_string_template():
    with pytest.raises(FuselmError, match=r"model\.gguf: key 'tokenizer\.chat_template': chat template must be a str"):
        render(["x"], MESSAGES, source="model.gguf: key 'tokenizer.chat_template'")
