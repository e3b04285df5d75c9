"""memh target: hand-worked packings, and golden -> memh -> parsed back for every type and width."""

import numpy as np
import pytest
from refsim.dtypes import TYPES
from refsim.golden.memh import MemhError, decode_words, encode_words, parse_words, words_needed
from refsim.hw_vectors.memh import WORD_BITS, memh_text


def word_lines(text: bytes) -> list[str]:
    return [line.split("//")[0].strip() for line in text.decode().splitlines() if line.split("//")[0].strip()]


def test_int8_in_32_bit_words_puts_element_0_in_the_low_byte():
    # 1 -> 01, -2 -> fe, 3 -> 03, 4 -> 04: word 0 = 0x0403fe01; 5 alone pads to 0x00000005.
    text = memh_text(np.array([1, -2, 3, 4, 5], np.int8), "int8", "t", 32)
    assert word_lines(text) == ["0403fe01", "00000005"]


def test_int4_in_8_bit_words_packs_two_nibbles_low_first():
    # 1 -> 0x1, -1 -> 0xf: 0xf1; 7 -> 0x7, -8 -> 0x8: 0x87.
    assert word_lines(memh_text(np.array([1, -1, 7, -8], np.int8), "int4", "t", 8)) == ["f1", "87"]


def test_ternary_packs_four_per_byte():
    # -1 -> 0b11, 0 -> 0b00, 1 -> 0b01, -1 -> 0b11: 0b11_01_00_11 = 0xd3.
    assert word_lines(memh_text(np.array([-1, 0, 1, -1], np.int8), "ternary", "t", 8)) == ["d3"]


def test_int2_hand_worked():
    # -2 -> 0b10 (lane 0), 1 -> 0b01 (lane 1), 0, 0, then 1 in lane 4 (bits 8-9):
    # 0b01_00_00_01_10 = 0x106.
    assert word_lines(memh_text(np.array([-2, 1, 0, 0, 1], np.int8), "int2", "t", 16)) == ["0106"]


def test_wide_values_span_words_least_significant_first():
    # int32 -2 = 0xfffffffe in 8-bit words: fe ff ff ff. uint16 0x1234 in 8-bit words: 34 12.
    assert word_lines(memh_text(np.array([-2], np.int32), "int32", "t", 8)) == ["fe", "ff", "ff", "ff"]
    assert word_lines(memh_text(np.array([0x1234], np.uint16), "uint16", "t", 8)) == ["34", "12"]
    # int64 minimum in 32-bit words: 0x00000000 then 0x80000000.
    assert word_lines(memh_text(np.array([-(1 << 63)], np.int64), "int64", "t", 32)) == ["00000000", "80000000"]


def test_address_comments_name_the_elements_of_each_word():
    lines = memh_text(np.arange(6, dtype=np.int8), "int8", "t", 32, addresses=True).decode().splitlines()
    assert lines[2:] == ["03020100 // @0: elements 0..3", "00000504 // @1: elements 4..5"]


@pytest.mark.parametrize("word_bits", WORD_BITS)
@pytest.mark.parametrize("dtype", sorted(TYPES))
def test_round_trip_every_type_and_width(dtype, word_bits):
    t = TYPES[dtype]
    rng = np.random.default_rng(word_bits * 7 + t.bits)
    for shape in [(0,), (1,), (3, 5), (2, 3, 7)]:
        values = rng.integers(t.lo, t.hi, size=shape, endpoint=True).astype(t.storage)
        values.reshape(-1)[:2] = [t.lo, t.hi][: values.size]  # the extremes, where they fit
        text = memh_text(values, dtype, "x", word_bits)
        words = parse_words(text.decode(), word_bits, "x")
        assert words.size == words_needed(values.size, t.bits, word_bits)
        back = decode_words(words, t.bits, t.signed, values.size, word_bits)
        assert back.reshape(shape).tolist() == values.astype(np.int64).tolist()


def test_parser_follows_addresses_and_skips_comments():
    text = "// header /* not a block\n@2 0c // c\n/* block\n 99 */ 0d\n@0 0a 0b\n"
    assert parse_words(text, 8, "f").tolist() == [10, 11, 12, 13]


@pytest.mark.parametrize("text, message", [
    ("0a\n@3 0b\n", "no word at address 0x1"),
    ("1ff\n", "wider than 8 bits"),
    ("0x\n", "not a hex word"),
])
def test_parser_rejects_what_it_cannot_compare(text, message):
    with pytest.raises(MemhError, match=message):
        parse_words(text, 8, "f")


def test_encode_matches_decode_for_unsigned_64_bit_words():
    words = encode_words(np.array([0xFFFFFFFF, 1], np.uint32), 32, 64)
    assert words.tolist() == [0x00000001FFFFFFFF]
    assert decode_words(words, 32, False, 2, 64).tolist() == [0xFFFFFFFF, 1]
