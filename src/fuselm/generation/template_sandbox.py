"""A jinja2 sandbox for chat templates from model files, with limits on time, memory and output.

Chat templates come with the model (tokenizer_config.json, GGUF `tokenizer.chat_template`), so they are untrusted
code. jinja2's ImmutableSandboxedEnvironment already refuses dunder attributes, unsafe callables and mutation of
lists and dicts; this environment adds what it leaves open:
- time: every loop step, call, attribute and item access, operator and output piece ticks a deadline;
- loops: range() is capped, and every `for` iterates through a ticking wrapper (nested loops hit the deadline);
- memory: every operation that can make a large object in one step is checked *before* it runs (string and list
  repetition, `**`, `+`, `~`, `%` and str.format widths, join, replace, center/ljust/rjust/zfill/expandtabs,
  indent, batch/slice, tojson indents) and every new string or list is charged to a byte budget;
- output: the rendered text is capped.
Any breach raises TemplateLimit (a jinja2 SecurityError), which chat.render turns into one FuselmError.
"""

from __future__ import annotations

import functools
import math
import re
import string
import time
from _string import formatter_field_name_split  # what jinja2's sandbox uses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.visitor import NodeTransformer


@dataclass(frozen=True)
class TemplateLimits:
    seconds: float = 2.0
    max_chars: int = 4 * 2**20  # any one string or list, and the output (raised to fit long conversations)
    budget_chars: int = 64 * 2**20  # all strings and lists the template makes, together
    max_range: int = 100_000
    max_source_chars: int = 128 * 2**10  # published templates are at most tens of KB


class TemplateLimit(SecurityError):
    """A chat template went past one of its limits."""


def _size(value: Any) -> int:
    if isinstance(value, (str, bytes)):
        return len(value)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        return 8 * len(value)
    return 0


_WIDTH = re.compile(r"\d+")


class _Limiter(NodeTransformer):
    """Every `for` iterates through environment.checked_iter, and every `a ~ b` becomes
    environment.checked_concat(a, b), so loops tick the deadline and a concatenation's size is known before the
    join. (Environment attributes cannot be shadowed by template variables.)"""

    def visit_For(self, node: nodes.For) -> nodes.For:  # noqa: N802 (jinja2 dispatches by node class name)
        node = self.generic_visit(node)
        node.iter = _env_call("checked_iter", [node.iter])
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:  # noqa: N802
        node = self.generic_visit(node)
        return _env_call("checked_concat", node.nodes)


def _env_call(name: str, args: list) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)


class LimitedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, limits: TemplateLimits, **options: Any):
        self.limits = limits
        self.deadline = time.monotonic() + limits.seconds
        self.budget = limits.budget_chars
        super().__init__(**options)
        self.globals["range"] = self.checked_range
        self.globals["strftime_now"] = lambda fmt: datetime.now().strftime(str(fmt)[:256])
        self.globals.pop("lipsum", None)
        for name, check in _FILTER_CHECKS.items():
            self.filters[name] = self._filter(self.filters[name], check)

    # ---- accounting

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"rendering took longer than {self.limits.seconds:g} s")

    def charge(self, value: Any) -> Any:
        self.tick()
        size = _size(value)
        if size > self.limits.max_chars:
            raise TemplateLimit(f"a value of {size} characters/items is larger than {self.limits.max_chars}")
        self.budget -= size
        if self.budget < 0:
            raise TemplateLimit(f"the template made more than {self.limits.budget_chars} characters of strings")
        return value

    def allow(self, size: int, what: str) -> None:
        """Refuse, before it is made, a result of `size` characters/items."""
        if size > self.limits.max_chars:
            raise TemplateLimit(f"{what} would make {size} characters/items (limit {self.limits.max_chars})")

    # ---- hooks of the sandbox

    def checked_range(self, *args: int) -> range:
        self.tick()
        rng = range(*args)
        if len(rng) > self.limits.max_range:
            raise TemplateLimit(f"range() of {len(rng)} items (limit {self.limits.max_range})")
        return rng

    def checked_iter(self, iterable: Iterable) -> Iterator:
        for item in iterable:
            self.tick()
            yield item

    def checked_concat(self, *pieces: Any) -> str:
        parts = [str(p) for p in pieces]
        self.allow(sum(map(len, parts)), "'~'")
        return self.charge("".join(parts))

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        self.tick()
        if op == "*":
            for seq, count in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(count, int):
                    self.allow(len(seq) * max(count, 0), "'*'")
        elif op == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log2(abs(left)) > 4 * self.limits.max_chars:
                raise TemplateLimit(f"{left} ** {right} is too large a number")
        elif op == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            self.allow(len(left) + len(right), "'+'")
        elif op == "%" and isinstance(left, str):
            self._check_printf(left, right)
        return self.charge(self.binop_table[op](left, right))

    def _check_printf(self, fmt: str, args: Any) -> None:
        values = args.values() if isinstance(args, dict) else args if isinstance(args, tuple) else (args,)
        numbers = [int(w) for w in _WIDTH.findall(fmt)] + [v for v in values if isinstance(v, int)]
        if "*" in fmt and any(n > self.limits.max_chars for n in numbers) or any(
                int(w) > self.limits.max_chars for w in _WIDTH.findall(fmt)):
            raise TemplateLimit("a '%' format width is too large")

    def getattr(self, obj: Any, attribute: str) -> Any:
        self.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        self.tick()
        value = super().getitem(obj, argument)
        return self.charge(value) if isinstance(argument, slice) else value

    def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja2's signature)
        __self.tick()
        __self._check_method(__obj, args, kwargs)
        return __self.charge(super().call(__context, __obj, *args, **kwargs))

    def _check_method(self, fn: Any, args: tuple, kwargs: dict) -> None:
        owner, name = getattr(fn, "__self__", None), getattr(fn, "__name__", "")
        if not isinstance(owner, str):
            return
        if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
            self.allow(args[0], f"str.{name}")
        elif name == "expandtabs":
            size = args[0] if args else kwargs.get("tabsize", 8)
            self.allow(len(owner) + owner.count("\t") * (size if isinstance(size, int) else 8), "str.expandtabs")
        elif name == "join" and args:
            items = list(args[0]) if not isinstance(args[0], (list, tuple, str)) else args[0]
            self.allow(sum(len(str(i)) for i in items) + len(owner) * max(len(items) - 1, 0), "str.join")
        elif name == "replace" and len(args) >= 2:
            self.allow(_replaced_size(owner, args[0], args[1], args[2] if len(args) > 2 else -1), "str.replace")
        elif name == "translate":
            raise TemplateLimit("str.translate is not allowed in chat templates")

    def wrap_str_format(self, value: Any):
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        env = self

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> str:
            env.tick()
            return env.charge(_WidthCheckedFormatter(env).vformat(value.__self__, args, kwargs)
                              if value.__name__ == "format" else wrapped(*args, **kwargs))

        return checked

    def _filter(self, fn, check):
        env = self

        @functools.wraps(fn)
        def checked(*args: Any, **kwargs: Any) -> Any:
            env.tick()
            check(env, fn, args, kwargs)
            return env.charge(fn(*args, **kwargs))

        return checked

    # ---- compiling: every `for` and `~` goes through the checked versions above

    def compile_limited(self, source: str) -> jinja2.Template:
        """The template bound to this environment (and its budget). Compiling cannot be interrupted, so the source
        size is capped (compile time grows with it: about 40 ms per KB here), and compiled code is cached: a
        server renders the same template for every request."""
        if len(source) > self.limits.max_source_chars:
            raise TemplateLimit(f"the template has {len(source)} characters (limit {self.limits.max_source_chars})")
        code = _compiled(source, self.trim_blocks, self.lstrip_blocks)
        return self.template_class.from_code(self, code, self.make_globals(None), None)


@functools.lru_cache(maxsize=32)
def _compiled(source: str, trim_blocks: bool, lstrip_blocks: bool):
    env = LimitedEnvironment(TemplateLimits(), trim_blocks=trim_blocks, lstrip_blocks=lstrip_blocks)
    return env.compile(_Limiter().visit(env.parse(source)))


class _WidthCheckedFormatter(string.Formatter):
    """str.format with the sandbox's attribute rules and every width/precision checked before formatting."""

    def __init__(self, env: LimitedEnvironment):
        self.env = env

    def get_field(self, field_name, args, kwargs):
        first, rest = formatter_field_name_split(field_name)
        obj = self.get_value(first, args, kwargs)
        for is_attr, i in rest:
            obj = self.env.getattr(obj, i) if is_attr else self.env.getitem(obj, i)
        return obj, first

    def format_field(self, value, format_spec):
        for width in _WIDTH.findall(format_spec):
            self.env.allow(int(width), "a format width")
        return super().format_field(value, format_spec)


def _replaced_size(s: str, old: Any, new: Any, count: Any) -> int:
    old, new = str(old), str(new)
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * (len(new) - len(old))


# ---- filters that can make a large value from a small one, each with its check before running

def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    return args[index] if len(args) > index else kwargs.get(name, default)


def _check_center(env, fn, args, kwargs):
    width = _arg(args, kwargs, 1, "width", 80)
    if isinstance(width, int):
        env.allow(width, "center")


def _check_indent(env, fn, args, kwargs):
    text, width = str(args[0]) if args else "", _arg(args, kwargs, 1, "width", 4)
    size = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    env.allow(len(text) + (text.count("\n") + 1) * size, "indent")


def _check_replace(env, fn, args, kwargs):
    # do_replace(eval_ctx, s, old, new, count=None)
    s, old, new = (str(args[1]), args[2], args[3]) if len(args) >= 4 else ("", "", "")
    count = _arg(args, kwargs, 4, "count", None)
    env.allow(_replaced_size(s, old, new, count if count is not None else -1), "replace")


def _check_join(env, fn, args, kwargs):
    # do_join(eval_ctx, value, d="", attribute=None): measured on the items as strings
    value, sep = (args[1] if len(args) > 1 else ()), str(_arg(args, kwargs, 2, "d", ""))
    if isinstance(value, (list, tuple, str)):
        env.allow(sum(len(str(i)) for i in value) + len(sep) * max(len(value) - 1, 0), "join")


def _check_format(env, fn, args, kwargs):
    if args:
        env._check_printf(str(args[0]), tuple(args[1:]) or dict(kwargs))


def _check_count(name: str, index: int, key: str):
    def check(env, fn, args, kwargs):
        n = _arg(args, kwargs, index, key, 1)
        if isinstance(n, int) and n > env.limits.max_range:
            raise TemplateLimit(f"{name} of {n} (limit {env.limits.max_range})")
    return check


def _check_tojson(env, fn, args, kwargs):
    indent = _arg(args, kwargs, 2, "indent", None)
    if isinstance(indent, int) and indent > 64:
        raise TemplateLimit(f"tojson indent of {indent} (limit 64)")


def _check_sum(env, fn, args, kwargs):
    start = _arg(args, kwargs, 3, "start", 0)
    if not isinstance(start, (int, float)):
        raise TemplateLimit("sum() of non-numbers is not allowed in chat templates")


_FILTER_CHECKS = {
    "center": _check_center, "indent": _check_indent, "replace": _check_replace, "join": _check_join,
    "format": _check_format, "batch": _check_count("batch", 1, "linecount"),
    "slice": _check_count("slice", 1, "slices"), "tojson": _check_tojson, "sum": _check_sum,
}
