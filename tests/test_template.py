"""Chat templates: rendered as llama-cpp-python renders them, and stopped when they run away."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from click.testing import CliRunner
from llama_cpp import llama_chat_format
from llama_cpp.llama_chat_format import Jinja2ChatFormatter

from eft_local import EFT, EFTError
from eft_local.cli import main
from eft_local.chat.sandbox import MAX_BUILT, MAX_INT_BITS, MAX_OUTPUT, TIME_LIMIT
from eft_local.chat.template import SAMPLE_CHAT, ChatTemplate
from eft_local.runtime.context import LocalBackend
from eft_local.runtime.vocab import read_vocab
from tiny_gguf import CHATML_TEMPLATE, write_tiny_llama

NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
HUGE_PRODUCT = "{{ 'A' * 4000000000 }}"
BROKEN = "{% for message in messages %}{{ message.content }}"

TOO_LONG = f"rendering took longer than {TIME_LIMIT:g} s"
TOO_BIG = f"values built while rendering would exceed {MAX_BUILT} characters"

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name a fruit that is yellow."},
    ],
    list(SAMPLE_CHAT),
]

# Most of what chat templates use, and the operations the renderer charges.
FEATURES = """
{%- macro tag(m) -%}[{{ m.role|upper }}]{%- endmacro -%}
{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{%- for message in messages -%}
{%- if loop.index > 10 %}{% break %}{% endif -%}
{%- if message.role == 'system' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{%- set head %}{{ tag(message) }} #{{ loop.index }}{% endset -%}
{{ head ~ ' ' ~ ('%-10s|' % message.role) ~ '{:>6}'.format(ns.n) }}
{{ message.content|replace('a', 'A')|center(40)|indent(2) }}
{{ message.content|wordwrap(12) }}
{{ message.content.split(' ')|join('_') }} {{ message.content.split()|length }}
{{ (message.content|list|batch(3, '-')|list)[:2]|tojson }}
{{ message|tojson(indent=2) }} {{ message.items()|list }}
{% generation %}{{ message.content.rjust(50, '.') ~ eos_token }}{% endgeneration %}
{%- endfor -%}
{{ [1, 2, 3]|slice(2)|list }} {{ tools is none }} {{ strftime_now('%Y') }} {{ 2 ** 10 }} {{ 'ab' * 3 }}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}
"""


def llama_cpp_render(template: str, messages, bos: str = "<s>", eos: str = "</s>") -> str:
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)(messages=messages).prompt


def render(template: str, messages=CHATS[0], path: str = "model.gguf") -> str:
    return ChatTemplate(template, path).render(messages, bos="<s>", eos="</s>")


def render_error(template: str, path: str = "model.gguf") -> tuple[str, float]:
    """The error message of rendering ``template``, and the seconds it took."""
    t0 = time.perf_counter()
    with pytest.raises(EFTError) as e:
        render(template, path=path)
    return str(e.value), time.perf_counter() - t0


@pytest.fixture(scope="module")
def smollm2_template(smollm2) -> str:
    return read_vocab(smollm2).chat_template


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> dict[str, str]:
    """Tuned models (the tiny tuned weights) whose chat templates misbehave."""
    d = tmp_path_factory.mktemp("hostile")
    templates = {"loops": NESTED_LOOPS, "product": HUGE_PRODUCT, "broken": BROKEN}
    return {name: str(write_tiny_llama(d / f"{name}.gguf", seed=2, chat_template=t)) for name, t in templates.items()}


# --- the same prompt as llama-cpp-python --------------------------------------------------


@pytest.mark.parametrize("messages", CHATS, ids=["user", "system", "turns"])
def test_renders_like_llama_cpp(messages, smollm2_template):
    for template in (CHATML_TEMPLATE, smollm2_template, FEATURES):
        assert render(template, messages) == llama_cpp_render(template, messages)


def test_environment_matches_llama_cpp():
    """The bounded environment is a copy of the one Jinja2ChatFormatter builds, whatever its version."""
    from eft_local.chat.sandbox import _environment

    ours = _environment()
    theirs = Jinja2ChatFormatter(template="", eos_token="", bos_token="")._environment.environment
    assert {type(e) for e in ours.extensions.values()} == {type(e) for e in theirs.extensions.values()}
    assert set(ours.filters) == set(theirs.filters) and set(ours.tests) == set(theirs.tests)
    assert set(ours.globals) == set(theirs.globals)
    assert (ours.trim_blocks, ours.lstrip_blocks, ours.keep_trailing_newline, ours.undefined) == (
        theirs.trim_blocks, theirs.lstrip_blocks, theirs.keep_trailing_newline, theirs.undefined)
    assert isinstance(ours, type(theirs))


def test_features_template_renders_what_it_should():
    """The comparison above means something: the features template really renders its parts."""
    out = render(FEATURES, list(SAMPLE_CHAT))
    assert out.startswith("<s>[USER] #1 user      |     1\n")
    assert "What_is_the_capital_of_France?" in out
    assert '[["W", "h", "a"], ["t", " ", "i"]]' in out
    assert out.endswith("[[1, 2], [3]] True " + time.strftime("%Y") + " 1024 ababab<|assistant|>")


def test_long_chat_renders_like_llama_cpp(smollm2_template):
    """A chat of 2 million characters is well inside the limits."""
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"{i} " + "word " * 2000}
                for i in range(200)]
    out = render(smollm2_template, messages)
    assert len(out) > 2_000_000
    assert out == llama_cpp_render(smollm2_template, messages)


def test_template_errors_are_one_line():
    multi = "{{ raise_exception('Conversation roles must alternate\\nuser/assistant') }}"
    with pytest.raises(ValueError, match="Conversation roles must alternate\nuser/assistant"):
        llama_cpp_render(multi, CHATS[0])
    assert render_error(multi)[0] == "chat template of model.gguf: Conversation roles must alternate user/assistant"
    assert render_error(BROKEN)[0] == (
        "chat template of model.gguf: Unexpected end of template. Jinja was looking for the following tags: "
        "'endfor' or 'else'. The innermost block that needs to be closed is 'for'. (line 1)"
    )
    assert render_error("{{ messages[0].nothing.here }}")[0] == (
        "chat template of model.gguf: 'dict object' has no attribute 'nothing'"
    )
    long = render_error("{{ raise_exception('x' * 10000) }}")[0]
    assert long == "chat template of model.gguf: " + "x" * 297 + "..."


# --- limits -------------------------------------------------------------------------------


def test_loops_that_print_nothing_stop_at_the_time_limit():
    message, elapsed = render_error(NESTED_LOOPS, path="/models/loops.gguf")
    assert message == f"chat template of /models/loops.gguf: {TOO_LONG}"
    assert TIME_LIMIT <= elapsed < TIME_LIMIT + 2
    # The interrupt went to the render alone: plain Python code right after it runs undisturbed.
    t0 = time.perf_counter()
    n = 0
    while time.perf_counter() - t0 < 0.5:
        n += 1
    assert n > 0
    assert render(CHATML_TEMPLATE) == llama_cpp_render(CHATML_TEMPLATE, CHATS[0])


def test_time_limit_stops_only_the_thread_that_renders():
    errors: list[str] = []

    def runaway() -> None:
        try:
            render(NESTED_LOOPS)
        except EFTError as e:
            errors.append(str(e))

    worker = threading.Thread(target=runaway)
    worker.start()
    renders = 0
    while worker.is_alive():
        assert render(CHATML_TEMPLATE, list(SAMPLE_CHAT)) == llama_cpp_render(CHATML_TEMPLATE, list(SAMPLE_CHAT))
        renders += 1
    worker.join()
    assert errors == [f"chat template of model.gguf: {TOO_LONG}"]
    assert renders > 10


def test_interrupt_swallowed_by_called_code_is_repeated():
    """Python drops an exception that lands in a finalizer; the watchdog interrupts again.

    The hook runs past the limit and swallows the first interrupt, so only a repeated one can
    end the render (whatever the machine's load does to the watchdog's timing).
    """
    swallowed = []

    def hook() -> str:
        t0 = time.perf_counter()
        while True:
            try:
                while time.perf_counter() - t0 < TIME_LIMIT + 5:
                    pass
                return "never stopped"
            except BaseException:
                if swallowed:
                    raise
                swallowed.append(time.perf_counter())

    messages = [{"role": "user", "content": "hi", "hook": hook}]
    t0 = time.perf_counter()
    with pytest.raises(EFTError) as e:
        ChatTemplate("{{ messages[0].hook() }}", "model.gguf").render(messages, bos="", eos="")
    elapsed = time.perf_counter() - t0
    assert str(e.value) == f"chat template of model.gguf: {TOO_LONG}"
    assert len(swallowed) == 1
    assert TIME_LIMIT <= elapsed < TIME_LIMIT + 3


def test_huge_product_is_refused_before_it_runs():
    message, elapsed = render_error(HUGE_PRODUCT)
    assert message == f"chat template of model.gguf: {TOO_BIG}"
    assert elapsed < 1


def test_huge_product_uses_no_memory(hostile):
    """Peak memory of a process that loads the model and renders its template barely moves (4 GB if it ran)."""
    script = f"""
import resource
from eft_local.core.errors import EFTError
from eft_local.chat.template import ChatTemplate
from eft_local.runtime.context import LocalBackend
messages = [{{"role": "user", "content": "hi"}}]
ChatTemplate("{{{{ 'A' * 4 }}}}", "warm.gguf").render(messages, bos="", eos="")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
LocalBackend({hostile["product"]!r}, n_ctx=64, n_threads=1).close()
loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ChatTemplate({HUGE_PRODUCT!r}, "hostile.gguf").render(messages, bos="", eos="")
except EFTError as e:
    print(e)
print(loaded - before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - loaded)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    message, grown = out.stdout.splitlines()
    assert message == f"chat template of hostile.gguf: {TOO_BIG}"
    load_kib, render_kib = map(int, grown.split())
    print(f"peak memory grew by {load_kib} KiB loading the model, {render_kib} KiB rendering")
    assert load_kib < 20 * 1024
    assert render_kib < 20 * 1024


def test_model_loading_leaves_templates_alone(hostile, tiny):
    """llama-cpp-python's Llama would compute the product as it compiles the templates at load;
    eft-local loads through llama.cpp's C API, which compiles nothing, and patches nothing."""
    t0 = time.perf_counter()
    LocalBackend(hostile["product"], n_ctx=64, n_threads=1).close()
    with EFT(tiny["base"], hostile["product"], tiny["reference"], n_threads=1) as eft:
        assert eft.generate("Hello world", raw=True, max_tokens=4, temperature=0).tokens
    assert time.perf_counter() - t0 < 5
    assert llama_chat_format.Jinja2ChatFormatter is Jinja2ChatFormatter


AMPLIFIERS = {
    "str method": "{{ 'x'.center(10000000000) }}",
    "filter": "{{ 'x'|center(10000000000) }}",
    "indent": "{{ 'a\\nb'|indent(10000000000) }}",
    "format": "{{ '{:>9999999999}'.format(1) }}",
    "format width from argument": "{{ '{:>{}}'.format(1, 9999999999) }}",
    "percent": "{{ '%09999999999d' % 1 }}",
    "percent star": "{{ '%*d' % (9999999999, 1) }}",
    "list product": "{{ [0] * 10000000000 }}",
    "printed dict": "{% set s = 'a' * 1000000 %}{{ dict.fromkeys(range(100), s) }}",
    "replace": "{% set s = 'ab' * 1000000 %}{{ s.replace('a', 'a' * 1000) }}",
    "expandtabs": "{{ ('a\\tb' * 100).expandtabs(1000000000) }}",
    "join filter": "{% set s = 'a' * 1000000 %}{{ range(1000)|join(s) }}",
    "join method": "{% set s = 'a' * 1000000 %}{{ s.join(range(1000)|map('string')) }}",
    "split": "{{ ('a ' * 30000000).split() }}",
    "characters": "{{ ('a' * 20000000)|list|length }}",
    "batch fill": "{{ [1]|batch(10000000000, 0)|list }}",
    "tojson doubling": "{% set ns = namespace(s='\\\\') %}{% for i in range(100) %}{% set ns.s = ns.s|tojson %}{% endfor %}",
    "concat doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "plus doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "block set doubling": "{% set ns = namespace(s='ab') %}{% for i in range(64) %}"
                          "{% set x %}{{ ns.s }}{{ ns.s }}{% endset %}{% set ns.s = x %}{% endfor %}",
    "accumulated list": "{% set ns = namespace(l=[]) %}{% for i in range(100000) %}"
                        "{% set ns.l = ns.l + ['a' * 1000000] %}{% endfor %}",
    "many results": "{{ range(100000)|map('center', 1000000)|list|length }}",
    "lipsum": "{{ lipsum(1000000000) }}",
    "strftime": "{{ strftime_now('%c' * 10000000) }}",
    "constant filter": "{{ 'x'|center(99999999999) }}",
}


@pytest.mark.parametrize("template", AMPLIFIERS.values(), ids=AMPLIFIERS.keys())
def test_amplifiers_are_refused(template):
    message, elapsed = render_error(template)
    assert message == f"chat template of model.gguf: {TOO_BIG}"
    assert elapsed < TIME_LIMIT


@pytest.mark.parametrize("template", ["{{ 2 ** 100000000 }}", "{{ (2 ** 60000) * (2 ** 60000) }}"])
def test_huge_numbers_are_refused(template):
    message, elapsed = render_error(template)
    assert message == f"chat template of model.gguf: a number would exceed {MAX_INT_BITS} bits"
    assert elapsed < 1


def test_output_limit():
    template = "{% set s = 'x' * 1000 %}{% for i in range(100000) %}{{ s }}{% endfor %}"
    message, elapsed = render_error(template)
    assert message == f"chat template of model.gguf: output exceeds {MAX_OUTPUT} characters"
    assert elapsed < TIME_LIMIT


def test_render_overhead(smollm2_template):
    """Rendering with limits costs about what rendering without them does, far less than compiling."""
    messages = list(SAMPLE_CHAT) * 5
    bounded = ChatTemplate(smollm2_template, "smollm2.gguf")
    formatter = Jinja2ChatFormatter(template=smollm2_template, eos_token="</s>", bos_token="<s>")
    runs = {
        "compile and render (llama-cpp-python, per request)":
            lambda: Jinja2ChatFormatter(template=smollm2_template, eos_token="</s>", bos_token="<s>")(messages=messages),
        "render only (llama-cpp-python)": lambda: formatter(messages=messages),
        "bounded render": lambda: bounded.render(messages, bos="<s>", eos="</s>"),
    }
    best = {name: float("inf") for name in runs}
    for _ in range(15):  # interleaved, so load from other processes hits all alike
        for name, run in runs.items():
            t0 = time.perf_counter()
            for _ in range(20):
                run()
            best[name] = min(best[name], (time.perf_counter() - t0) / 20)
    for name, seconds in best.items():
        print(f"{name}: {seconds * 1e6:.0f} us")
    print(f"bounded / unbounded render: {best['bounded render'] / best['render only (llama-cpp-python)']:.2f}")
    assert best["bounded render"] < best["compile and render (llama-cpp-python, per request)"]


# --- through the library and the command line ---------------------------------------------


@pytest.fixture
def no_template_at_load(monkeypatch):
    """Fail at once if loading a model compiles its chat template (minutes and 4 GB for the product)."""

    class Refused(Jinja2ChatFormatter):
        def __init__(self, *args, **kwargs):
            raise AssertionError("llama_cpp.Llama() compiled the chat template while loading the model")

    monkeypatch.setattr(llama_chat_format, "Jinja2ChatFormatter", Refused)


@pytest.mark.parametrize("name, reason", [("loops", TOO_LONG), ("product", TOO_BIG)], ids=["loops", "product"])
def test_eft_generate_fails_with_one_line(tiny, hostile, no_template_at_load, name, reason):
    with EFT(tiny["base"], hostile[name], tiny["reference"], n_ctx=256) as eft:
        t0 = time.perf_counter()
        with pytest.raises(EFTError) as e:
            eft.generate("Hello", max_tokens=2, temperature=0)
        elapsed = time.perf_counter() - t0
        assert str(e.value) == f"chat template of {hostile[name]}: {reason}"
        assert elapsed < TIME_LIMIT + 2
        # Raw prompts skip the template; the engine still works.
        assert len(eft.generate("Hello", raw=True, max_tokens=2, temperature=0, ignore_eos=True).tokens) == 2


def test_broken_template_fails_chats_only(tiny, hostile, no_template_at_load):
    with EFT(tiny["base"], hostile["broken"], tiny["reference"], n_ctx=256) as eft:
        with pytest.raises(EFTError, match=r"^chat template of .*broken\.gguf: Unexpected end of template\."):
            eft.chat([{"role": "user", "content": "Hello"}], max_tokens=2)
        assert len(eft.generate("Hello", raw=True, max_tokens=2, ignore_eos=True).tokens) == 2


def one_error_line(result) -> str:
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.parametrize("command", [["check"], ["generate", "Hello", "-n", "2", "--threads", "1"]], ids=["check", "generate"])
@pytest.mark.parametrize("name, reason", [("loops", TOO_LONG), ("product", TOO_BIG), ("broken", None)],
                         ids=["loops", "product", "broken"])
def test_cli_fails_with_one_line(tiny, hostile, no_template_at_load, command, name, reason):
    t0 = time.perf_counter()
    result = CliRunner().invoke(main, [*command, "-m", str(tiny["base"]), "--tuned", hostile[name], "--reference", str(tiny["reference"])])
    elapsed = time.perf_counter() - t0
    line = one_error_line(result)
    if reason is None:
        assert line.startswith(f"error: chat template of {hostile[name]}: Unexpected end of template.")
    else:
        assert line == f"error: chat template of {hostile[name]}: {reason}"
    assert elapsed < TIME_LIMIT + 3
    assert "compatible" not in result.stdout


@pytest.mark.parametrize("tuned", ["tiny", "smollm2"])
def test_check_passes_a_good_template(tiny, smollm2, tuned):
    paths = [str(tiny["base"]), str(tiny["tuned"]), str(tiny["reference"])] if tuned == "tiny" else [str(smollm2)] * 3
    result = CliRunner().invoke(main, ["check", "-m", paths[0], "--tuned", paths[1], "--reference", paths[2]])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].startswith("compatible: ")
    assert result.stderr == ""
