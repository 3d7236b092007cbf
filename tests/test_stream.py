"""The stdin stream in-process: order, batching and errors."""

from __future__ import annotations

from modelport.engine.stream import classify_stream


def test_order_is_kept_across_batches_with_errors(default_model, images, tmp_path):
    lines = []
    for i in range(37):
        lines.append(f"{images['cat'] if i % 3 else tmp_path / f'missing{i}.jpg'}\n")
    out = []
    failures = classify_stream(default_model, lines, out.append, top_k=1, batch_size=4)
    assert failures == 13
    assert [o["path"] for o in out] == [line.strip() for line in lines]
    for i, o in enumerate(out):
        assert ("error" in o) == (i % 3 == 0)


def test_empty_input(default_model):
    out = []
    assert classify_stream(default_model, [], out.append, top_k=1) == 0 and out == []
