"""The kernel's end-to-end tests for chat, streaming, stop strings, tools, structured output, regex and grammars,
run unchanged against ``backend=remote`` → a real ``llama-server`` (see conftest.py): the same requests must
get the same guarantees as from the local llama.cpp backend.

The test functions are the kernel's own (imported from ``tests/``) and the thinking plugin's; pytest runs them
here with this folder's ``server`` and ``client`` fixtures. Left out: tests of the local engine's internals (its
scheduler counters in ``/health``) and of kernel behaviour that no backend changes (request validation, hostile
input, aliases).

``test_openai_parse_with_a_pydantic_model`` is replaced by its own prompt in test_remote_backend.py: under
llama-server's GBNF the model chooses its own tokens for the text the grammar forces (llguidance, locally, forces
their canonical tokens), so greedy SmolLM2 takes another path on that prompt: a title of repeated dates until
``max_tokens``, inside the grammar but not a parse the openai client accepts.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[3]


def _kernel_module(name: str) -> ModuleType:
    path = ROOT / (name if "/" in name else f"tests/{name}.py")
    spec = importlib.util.spec_from_file_location(f"gallama_suite_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, str(path.parent))  # for the modules it imports from its own folder
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


def _take(module: str, *names: str) -> None:
    source = _kernel_module(module)
    for name in names:
        globals()[name] = getattr(source, name)


_take("test_chat", "test_non_stream_chat", "test_stream_equals_non_stream",
      "test_max_tokens_gives_length_and_exact_usage", "test_max_completion_tokens_is_honoured",
      "test_stop_string_across_chunk_edges_never_leaks",
      "test_stop_words_is_an_alias_of_stop", "test_leading_prompt_steers_and_is_not_returned",
      "test_seed_makes_sampling_repeatable", "test_sampling_parameters_are_accepted",
      "test_second_turn_reuses_cached_prefix", "test_a_parsed_message_goes_back_as_it_came",
      "test_a_stream_helper_message_goes_back_as_it_came")
_take("test_tools", "test_required_always_calls_valid_functions", "test_named_choice_calls_exactly_that_function",
      "test_none_never_calls", "test_auto_is_clean_text_or_valid_calls", "test_parallel_false_limits_to_one_call",
      "test_stream_deltas_and_accumulation_equal_non_stream", "test_history_with_tool_calls_and_results",
      "test_auto_without_tools_is_plain_chat", "test_parsed_tool_calls_go_back_with_their_results")
_take("test_structured", "test_json_schema_twenty_prompts_all_validate", "test_json_object",
      "test_json_schema_stream_equals_non_stream",
      "test_regex_pattern_whole_output", "test_regex_prefix_then_free_text_with_leading_prompt_and_stop",
      "test_lark_grammar", "test_unenforceable_constraints_are_400")
_take("test_concurrency", "test_eight_concurrent_streams_all_complete", "test_streams_report_json_chunks_and_done")
_take("plugins/feature_thinking/tests/test_thinking_e2e.py", "separate", "test_seed_example_hides_the_thinking",
      "test_return_thinking_true_prepends_the_thinking_to_the_content",
      "test_separate_puts_the_thinking_in_reasoning_content", "test_stream_separate_sends_reasoning_before_content",
      "test_json_schema_applies_to_the_answer_only", "test_required_tool_call_after_thinking",
      "test_regex_pattern_applies_to_the_answer_only", "test_invalid_template_is_400_and_the_server_stays_healthy")
