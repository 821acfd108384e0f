"""Property-based fuzzing (hypothesis, fixed budget) of chat-template rendering: random templates built from
jinja pieces, hostile ones included, render within their limits or fail with one FuselmError naming the source;
templates that stay within the limits render exactly as jinja2's own sandbox renders them (the reference)."""

from __future__ import annotations

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from fuselm.errors import FuselmError
from fuselm.generation.chat import render
from fuselm.generation.template_sandbox import TemplateLimits

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "hello world"}]
LIMITS = TemplateLimits(seconds=0.05, max_chars=20_000, budget_chars=200_000, max_range=300)

numbers = st.sampled_from(["0", "1", "3", "-1", "10", "299", "10**9", "2**40", "n", "messages|length"])
strings = st.sampled_from(["'x'", "'ab'", "m['content']", "m['role']", "bos_token", "''", "ns.s"])
expr = st.recursive(
    strings | numbers,
    lambda inner: st.builds("({} * {})".format, inner, inner) | st.builds("({} ~ {})".format, inner, inner)
    | st.builds("({} + {})".format, inner, inner) | st.builds("({} ** {})".format, inner, inner)
    | st.builds("{}|upper".format, inner) | st.builds("{}|center({})".format, inner, inner)
    | st.builds("{}|replace('x', {})".format, inner, inner)
    | st.builds("'{{:>{{}}}}'.format({}, {})".format, inner, inner)
    | st.builds("({}|list|join(','))".format, inner) | st.just("m.__class__"),
    max_leaves=4)
block = st.recursive(
    st.builds("{{{{ {} }}}}".format, expr) | st.builds("{{% set ns.s = {} %}}".format, expr),
    lambda inner: st.builds("{{% for i in range({}) %}}{}{{% endfor %}}".format, numbers, inner)
    | st.builds("{{% for m in messages %}}{}{{% endfor %}}".format, inner)
    | st.builds("{{% if {} %}}{}{{% else %}}{}{{% endif %}}".format, numbers, inner, inner)
    | st.builds("{}{}".format, inner, inner),
    max_leaves=5)
template = st.builds("{{% set n = 7 %}}{{% set ns = namespace(s='') %}}{{% set m = messages[1] %}}{}".format, block)


@FUZZ
@given(template)
def test_random_templates(source):
    start = time.monotonic()
    try:
        out = render(source, MESSAGES, source="fuzz.jinja", limits=LIMITS)
    except FuselmError as err:
        assert str(err).startswith("fuzz.jinja: "), err
        assert time.monotonic() - start < 5
        return
    assert len(out) <= LIMITS.max_chars
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    assert out == env.from_string(source).render(messages=MESSAGES, bos_token="", eos_token="",
                                                 add_generation_prompt=True)
