import pytest

from meshllm.errors import BadRanges
from meshllm.model.ranges import LayerRange, even_ranges, parse_ranges, validate_ranges


def test_parse_and_validate_tiling():
    rs = validate_ranges(parse_ranges("0-10, 10-20,20-30"), 30)
    assert [(r.start, r.stop) for r in rs] == [(0, 10), (10, 20), (20, 30)]
    assert [len(r) for r in rs] == [10, 10, 10]
    assert 9 in rs[0] and 10 not in rs[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0-10,12-30", "gap in layer ranges: layers 10-12"),
        ("0-10,8-30", "overlap"),
        ("0-10,10-31", "out of bounds"),
        ("0-10,10-20", "gap in layer ranges: layers 20-30"),
        ("5-30", "gap in layer ranges: layers 0-5"),
        ("10-20,0-10,20-30", "gap"),
    ],
)
def test_bad_tilings_name_the_problem(text, message):
    with pytest.raises(BadRanges, match=message):
        validate_ranges(parse_ranges(text), 30)


@pytest.mark.parametrize("text", ["", "0-", "a-b", "3-3", "5-2", "0:10", "0-10-20"])
def test_unparseable_or_empty_ranges(text):
    with pytest.raises(BadRanges):
        parse_ranges(text)


def test_even_ranges_differ_by_at_most_one():
    for layers in range(1, 40):
        for parts in range(1, layers + 1):
            rs = validate_ranges(even_ranges(layers, parts), layers)
            sizes = [len(r) for r in rs]
            assert len(rs) == parts and max(sizes) - min(sizes) <= 1


def test_even_ranges_rejects_more_parts_than_layers():
    with pytest.raises(BadRanges, match="cannot cut 4 layers into 5"):
        even_ranges(4, 5)
    with pytest.raises(BadRanges):
        even_ranges(4, 0)


def test_layer_range_str_roundtrip():
    assert LayerRange.parse(str(LayerRange(3, 7))) == LayerRange(3, 7)
