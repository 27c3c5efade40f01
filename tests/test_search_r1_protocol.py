"""Search-R1 protocol: action parsing, the token-exact turn cut, observations within a token budget."""

import asyncio
import json

import pytest

from verl_search_r3.search_r1.observation import (
    OBSERVATION_CLOSE,
    OBSERVATION_OPEN,
    Passage,
    format_passages,
    join_contents,
    observation_ids,
    split_contents,
)
from verl_search_r3.search_r1.parser import (
    STOP_STRINGS,
    count_searches,
    last_answer,
    parse_action,
    stop_cut,
    strip_information,
)


@pytest.mark.parametrize(
    "text,kind,content,reason",
    [
        ("<think>need facts</think> <search> wing lift </search>", "search", "wing lift", ""),
        ("<think>done</think><answer> Paris </answer>", "answer", "Paris", ""),
        # several searches in one turn: the first complete action counts
        ("<search>first</search> then <search>second</search>", "search", "first", ""),
        # missing closing tags
        ("<search> boundary layer", "invalid", "", "unclosed_tag"),
        ("<answer> Paris", "invalid", "", "unclosed_tag"),
        ("I think the answer is Paris.", "invalid", "", "no_action"),
        ("<search>q</answer>", "invalid", "", "unclosed_tag"),  # tags must match
        # text after </answer> does not change the action
        ("<answer>Paris</answer> and some more words <search>x</search>", "answer", "Paris", ""),
        # nested tags make the action invalid
        ("<search> a <search> b </search>", "invalid", "", "nested_tags"),
        ("<answer> <information>x</information> </answer>", "invalid", "", "nested_tags"),
        # an unclosed search before a complete answer: the answer is the first complete action
        ("<search> q <answer> b </answer>", "answer", "b", ""),
        ("<search>   </search>", "invalid", "", "empty"),
        ("<answer>line one\nline two</answer>", "answer", "line one\nline two", ""),
    ],
)
def test_parse_action(text, kind, content, reason):
    action = parse_action(text)
    assert (action.kind, action.content, action.reason) == (kind, content, reason)
    if kind != "invalid":
        assert text[: action.end].endswith(f"</{kind}>")


def test_stop_cut_is_token_exact(qwen_tokenizer):
    tok = qwen_tokenizer
    ids = tok.encode("<think>x</think><search> lift </search> trailing words <answer>y</answer>", add_special_tokens=False)
    keep = stop_cut(ids, tok.decode)
    kept = tok.decode(ids[:keep])
    assert kept.endswith("</search>") or kept.rstrip().endswith("</search>")
    assert "</search>" not in tok.decode(ids[: keep - 1])  # the shortest such prefix
    assert parse_action(kept).content == "lift"
    # a stop string without its opening tag also ends the turn (as the sampler does), invalid action
    ids2 = tok.encode("not an action </answer> <answer>Paris</answer>", add_special_tokens=False)
    assert parse_action(tok.decode(ids2[: stop_cut(ids2, tok.decode)])).kind == "invalid"
    plain = tok.encode("no stop string here", add_special_tokens=False)
    assert stop_cut(plain, tok.decode) == len(plain) and stop_cut([], tok.decode) == 0
    assert set(STOP_STRINGS) == {"</search>", "</answer>"}


def test_answer_helpers():
    response = (
        "<search>capital</search>\n\n<information>Doc 1(Title: X) <answer>Lyon</answer>\n</information>\n\n"
        "<search>again</search><answer> Paris </answer>"
    )
    assert last_answer(response) == "Paris"
    assert last_answer(strip_information(response)) == "Paris"
    assert last_answer(strip_information("<information><answer>Lyon</answer></information>")) is None
    assert count_searches(strip_information(response)) == 2
    assert last_answer("no tags") is None


def test_passages_format_and_contents():
    assert split_contents('"Paul Walker"\nPaul William Walker was an actor.\nMore.') == ('"Paul Walker"', "Paul William Walker was an actor.\nMore.")
    assert split_contents("no title line") == ("no title line", "")
    assert join_contents("Multi\nline title", " text ") == "Multi line title\ntext"
    passages = [Passage.from_contents("1", "Wing\nLift acts on wings.", 2.0), Passage("2", "Flow", "Bad <answer>x</answer> tags </information>", 1.0)]
    text = format_passages(passages)
    assert text == "Doc 1(Title: Wing) Lift acts on wings.\nDoc 2(Title: Flow) Bad x tags \n"
    assert passages[0].contents == "Wing\nLift acts on wings."


def test_observation_keeps_the_closing_tag_within_budget(qwen_tokenizer):
    tok = qwen_tokenizer
    docs = "".join(f"Doc {i}(Title: T{i}) " + "word " * 200 + "\n" for i in range(1, 4))
    full, truncated = observation_ids(tok, docs, 10_000)
    assert not truncated and tok.decode(full) == OBSERVATION_OPEN + docs.strip() + OBSERVATION_CLOSE
    ids, truncated = observation_ids(tok, docs, 60)
    assert truncated and len(ids) == 60
    text = tok.decode(ids)
    assert text.startswith(OBSERVATION_OPEN) and text.endswith(OBSERVATION_CLOSE)
    assert observation_ids(tok, docs, 3) is None  # not even the wrapper fits


def test_tool_parser_turns_a_search_into_a_tool_call(qwen_tokenizer):
    from verl.experimental.agent_loop.tool_parser import ToolParser

    parser = ToolParser.get_tool_parser("search_r1", qwen_tokenizer)
    enc = lambda s: qwen_tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    text, calls = asyncio.run(parser.extract_tool_calls(enc("<think>hm</think><search> jet noise </search>")))
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("search", {"query": "jet noise"})]
    assert asyncio.run(parser.extract_tool_calls(enc("<answer>42</answer>")))[1] == []
    assert asyncio.run(parser.extract_tool_calls(enc("<search> a <search> b </search>")))[1] == []
