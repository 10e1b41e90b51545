"""Benchmarks: exact NFE counts, and both commands end to end on tiny models."""

import math

import pytest

from conftest import tiny_pipeline
from streamdit.benchmark import NFECounter, count_nfes, main
from streamdit.evaluate import wilson_interval

PROMPT = "a red circle moving left"


@pytest.mark.parametrize(
    "options, startup, per_chunk",
    [
        # the tiny partition: N = 4 chunks of c = 2 in the buffer, s = 2 micro steps, T = s * N = 8
        (dict(), 8, 2),
        (dict(guidance_scale=2.0), 16, 4),  # guidance: a conditional and an unconditional evaluation per micro step
        (dict(micro_steps=1), 4, 1),
        (dict(micro_steps=3, guidance_scale=3.0), 24, 6),
    ],
)
def test_count_nfes_per_chunk(pipe, options, startup, per_chunk):
    assert count_nfes(pipe, PROMPT, **options) == (startup, per_chunk)


def test_nfe_counter_counts_evaluations_per_prompt(pipe):
    with NFECounter(pipe.transformer, prompts=2) as counter:
        pipe([PROMPT, "a blue square"], num_frames=8, guidance_scale=2.0)  # 8 micro steps over 4 batch rows
    assert counter.count == 8 * 2
    pipe(PROMPT, num_frames=8)
    assert counter.count == 8 * 2  # the hook left with the context


def table_rows(text):
    """{model: [cells]} of a markdown table's body."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_stream_benchmark_runs_end_to_end(tmp_path, capsys):
    teacher = tiny_pipeline()
    teacher.register_to_config(guidance_scale=2.0)  # stored defaults: s = 2, guidance 2
    teacher.save_pretrained(tmp_path / "teacher")
    tiny_pipeline(seed=1, micro_steps=2).save_pretrained(tmp_path / "student")  # a student with s' = 2
    out = tmp_path / "bench" / "stream.md"
    main(["stream", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "student"),
          "--seconds", "2", "--prompts", "2", "--device", "cpu", "--out", str(out)])
    printed = capsys.readouterr().out
    written = out.read_text()
    assert "threads" in written and "device: cpu" in written and written.strip() in printed.strip()
    rows = table_rows(written)
    assert list(rows) == ["teacher", "student", "teacher, undistilled s=1", "teacher, undistilled s=2"]
    # s, guidance, NFEs per chunk, start-up NFEs: the teacher's 2 guided micro steps are 2 * 2 = 4 NFEs per chunk
    assert rows["teacher"][:4] == ["2", "2", "4", "16"]
    assert rows["student"][:4] == ["2", "1", "2", "8"]
    assert rows["teacher, undistilled s=1"][:4] == ["1", "1", "1", "4"]
    assert rows["teacher, undistilled s=2"][:4] == ["2", "1", "2", "8"]
    for cells in rows.values():
        first_frame, fps, adherence = (float(c) for c in cells[4:7])
        assert first_frame > 0 and fps > 0 and math.isfinite(fps) and 0 <= adherence <= 1
        low, high = (float(x) for x in cells[7].split("-"))  # 2 streams: a wide interval around the proportion
        assert (low, high) == tuple(round(x, 2) for x in wilson_interval(round(adherence * 2), 2))


def test_stream_benchmark_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--seconds=0"):
        main(["stream", "--teacher", str(tmp_path), "--seconds", "0"])
    with pytest.raises(ValueError, match="--prompts=0"):
        main(["stream", "--teacher", str(tmp_path), "--prompts", "0"])


def test_attention_benchmark_still_runs(capsys):
    main(["attention", "--preset", "tiny", "--frames", "4", "8", "--repeats", "1", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert "threads" in printed and "| 4 | 64 |" in printed and "| 8 | 128 |" in printed
