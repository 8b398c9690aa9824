"""TextStream: whole UTF-8 characters only, and stop strings never shown."""

from __future__ import annotations

from eft_local.core.textstream import TextStream


def run(stream: TextStream, pieces: list[bytes]) -> list[str]:
    """Feed every piece, then flush; return what each call released."""
    out = [stream.feed(p) for p in pieces]
    out.append(stream.flush())
    return out


def test_plain_text_is_released_immediately():
    s = TextStream()
    assert s.feed(b"Hello") == "Hello"
    assert s.feed(b" world") == " world"
    assert s.flush() == ""
    assert s.text == "Hello world"
    assert not s.stopped


def test_multibyte_character_split_across_pieces_is_emitted_once_whole():
    euro = "€".encode()  # 3 bytes: e2 82 ac
    s = TextStream()
    assert s.feed(b"a" + euro[:1]) == "a"
    assert s.feed(euro[1:2]) == ""
    assert s.feed(euro[2:] + b"b") == "€b"
    assert s.flush() == ""
    assert s.text == "a€b"


def test_four_byte_character_one_byte_per_piece():
    emoji = "😀".encode()
    s = TextStream()
    assert [s.feed(emoji[i : i + 1]) for i in range(4)] == ["", "", "", "😀"]


def test_incomplete_trailing_character_becomes_replacement_only_at_flush():
    s = TextStream()
    assert s.feed(b"ok \xe2\x82") == "ok "  # the start of a 3-byte character: held, not replaced
    assert s.flush() == "\ufffd"
    assert s.text == "ok \ufffd"


def test_invalid_byte_is_replaced_not_raised():
    s = TextStream()
    out = run(s, [b"a\xffb"])
    assert "".join(out) == "a\ufffdb"


def test_stop_string_spanning_pieces_is_never_released():
    s = TextStream(stops=["<|im_end|>"])
    pieces = [b"Hi there", b" <|im", b"_e", b"nd|", b">after"]
    out = [s.feed(p) for p in pieces]
    assert s.stopped
    assert "".join(out) == "Hi there "
    assert s.text == "Hi there "
    assert "<" not in s.text and "after" not in s.text
    # Nothing of the partial stop leaked in any intermediate piece either.
    assert all("<|" not in o for o in out)


def test_lookalike_prefix_is_released_once_it_cannot_be_a_stop():
    s = TextStream(stops=["STOP"])
    assert s.feed(b"go ST") == "go "  # "ST" could start "STOP": held
    assert s.feed(b"O") == ""
    assert s.feed(b"RM") == "STORM"  # "STOR" is not a prefix of "STOP"
    assert not s.stopped
    assert s.feed(b" ST") == " "
    assert s.flush() == "ST"  # end of generation: a held prefix is real text
    assert s.text == "go STORM ST"


def test_held_prefix_restarts_inside_itself():
    # "aab" with stop "ab": the first "a" is released, the second may still start the stop.
    s = TextStream(stops=["ab"])
    assert s.feed(b"a") == ""
    assert s.feed(b"a") == "a"
    assert s.feed(b"b") == ""
    assert s.stopped
    assert s.text == "a"


def test_earliest_of_several_stops_wins():
    s = TextStream(stops=["world", "lo w", "xyz"])
    out = run(s, [b"hel", b"lo world"])
    assert s.stopped
    assert s.text == "hel"
    assert "".join(out) == "hel"


def test_earliest_stop_wins_within_one_piece_regardless_of_list_order():
    s = TextStream(stops=["B", "A"])
    assert s.feed(b"xxAyyB") == "xx"
    assert s.stopped


def test_stop_at_the_very_start_releases_nothing():
    s = TextStream(stops=["</s>"])
    assert s.feed(b"</s>rest") == ""
    assert s.stopped and s.text == ""


def test_stop_string_with_multibyte_characters():
    stop = "»»"
    s = TextStream(stops=[stop])
    data = "né »» x".encode()
    out = [s.feed(data[i : i + 1]) for i in range(len(data))]
    assert s.stopped
    assert "".join(out) == "né "


def test_text_is_the_concatenation_of_released_pieces():
    s = TextStream(stops=["##"])
    pieces = [b"a#", b"b", "é".encode()[:1], "é".encode()[1:], b"#c", b"#", b"#", b"d"]
    out = run(s, pieces)
    assert s.stopped
    assert s.text == "".join(out) == "a#bé#c"


def test_after_stop_feed_and_flush_return_nothing():
    s = TextStream(stops=["END"])
    s.feed(b"abcEND")
    assert s.stopped and s.text == "abc"
    assert s.feed(b"more text") == ""
    assert s.flush() == ""
    assert s.text == "abc"


def test_empty_stop_strings_are_ignored():
    s = TextStream(stops=["", "Z"])
    assert s.feed(b"abc") == "abc"
    assert not s.stopped
