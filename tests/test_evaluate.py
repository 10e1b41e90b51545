"""The pixel detector: it must read the generator's own videos correctly and reject captions they do not match."""

import numpy as np
import pytest
import torch

from streamdit.data import SIDE, Scene, caption, render, sample_scene
from streamdit.evaluate import (adherence, evaluate_adherence, random_prompts, read_video, score_streams, stream_frames,
                                summarise)

PROMPT = "a red circle moving left"


def test_detector_scores_generator_videos_at_100_percent():
    rng = np.random.default_rng(7)
    rows = []
    for _ in range(60):
        scene = sample_scene(rng)
        prompt = caption(scene, rng)
        reading = read_video(render(scene, 24))
        rows.append({"prompt": prompt, "reading": reading, "adherence": adherence(reading, prompt)})
    result = summarise(rows)
    assert result["all_attributes"] == 1.0
    assert result["identity"] == 1.0 and result["smoothness"] == 1.0 and result["flicker"] == 0.0


def test_the_results_prompts_stay_the_same_draw():
    # the README's numbers were measured on random_prompts(100, 1000): a change to the scene sampler that moved them
    # would quietly make every later measurement incomparable with the earlier ones
    assert random_prompts(3, 1000) == ["a green square moving up quickly",
                                       "a green triangle moving up slowly on a gray background",
                                       "a small red triangle moving right on a black background"]


@pytest.mark.parametrize(
    "wrong, attribute",
    [
        ("a large blue square moving right on a black background", "colour"),
        ("a large red circle moving right on a black background", "shape"),
        ("a small red square moving right on a black background", "size"),
        ("a large red square moving up on a black background", "direction"),
        ("a large red square moving right quickly on a black background", "speed"),
        ("a large red square moving right on a white background", "background"),
    ],
)
def test_detector_rejects_mismatched_captions(wrong, attribute):
    scene = Scene("red", "square", "large", "right", "normal", "black", 30.0, 100.0)
    reading = read_video(render(scene, 24))
    assert all(adherence(reading, caption(scene, omit=0)).values())
    judged = adherence(reading, wrong)
    assert not judged[attribute] and all(v for k, v in judged.items() if k != attribute)


def test_detector_follows_an_object_across_the_torus_edge():
    scene = Scene("green", "triangle", "small", "left", "quickly", "gray", 5.0, 126.0)  # straddles two edges
    reading = read_video(render(scene, 24))
    assert (reading["shape"], reading["direction"], reading["speed"]) == ("triangle", "left", "quickly")


def test_detector_sees_flicker_and_identity_loss():
    a = render(Scene("red", "square", "large", "right", "normal", "black", 60.0, 60.0), 12)
    b = render(Scene("blue", "circle", "small", "right", "normal", "white", 84.0, 60.0), 12, start=12)
    reading = read_video(np.concatenate([a, b[:4], a[:8]]))  # identity and background change mid-clip
    assert reading["identity"] == pytest.approx(20 / 24) and reading["flicker"] == pytest.approx(4 / 24)
    blank = np.zeros((8, SIDE, SIDE, 3), np.uint8)
    assert read_video(blank)["colour"] is None and read_video(blank)["object_frames"] == 0


def test_stream_frames_switches_prompts_in_a_sequential_stream(pipe, monkeypatch):
    """A denoiser thread runs up to a chunk ahead by a timing-dependent amount: a switch would land anywhere in it."""
    modes, stream = [], pipe.stream
    monkeypatch.setattr(pipe, "stream", lambda *args, **options: modes.append(options["pipelined"]) or stream(
        *args, **options))
    plain = stream_frames(pipe, PROMPT, 1.0, seed=0)
    switched = stream_frames(pipe, PROMPT, 1.0, seed=0, switch=(0.5, "a blue square moving up"))
    assert modes == [None, False] and plain.shape == switched.shape == (16, 16, 16, 3)
    # Chunk 0 (8 frames, 0.5 s at 16 fps) is out before the switch; a sequential stream switches at the first micro
    # step of chunk 1, so chunk 1 is the one a hand-driven stream releases after set_prompt.
    assert np.array_equal(switched[:8], plain[:8])
    assert not np.array_equal(switched[8:], plain[8:])  # only its last 2 micro steps had the new prompt: a small change
    by_hand = stream(PROMPT, generator=torch.Generator().manual_seed(0), pipelined=False)
    next(by_hand)
    by_hand.set_prompt("a blue square moving up")
    assert np.array_equal(switched[8:], next(by_hand).frames)


class _StandIn:
    """An autoencoder stand-in: `decode(encode(x))` is `recon(x)`."""

    temporal_compression, device, dtype = 4, torch.device("cpu"), torch.float32

    def __init__(self, recon):
        self.recon = recon

    def encode(self, video):
        return video

    def decode(self, latents):
        return self.recon(latents)


def test_reconstruction_ceiling_reads_what_the_decoder_gives_back():
    from streamdit.evaluate import evaluate_reconstructions

    perfect = evaluate_reconstructions(_StandIn(lambda x: x), count=12, seed=3)
    assert perfect["all_attributes"] == 1.0
    blank = evaluate_reconstructions(_StandIn(lambda x: torch.zeros_like(x)), count=12, seed=3)  # gray, no object
    assert blank["adherence_colour"] == 0.0 and blank["all_attributes"] == 0.0


def test_a_window_reads_only_the_start_of_each_stream():
    """--windows W scores the first W seconds: here a clip that shows its caption for 1 s and then another scene."""
    rng = np.random.default_rng(11)
    first, then = sample_scene(rng, shape="circle"), sample_scene(rng, shape="triangle")
    clip = np.concatenate([render(first, 16), render(then, 32)])  # 1 s, then 2 s of another scene
    prompt = caption(first, omit=0.0)
    (whole,), (start,) = score_streams([prompt], [clip]), score_streams([prompt], [clip], seconds=1.0)
    assert all(start["adherence"].values()) and start["reading"]["shape"] == "circle"
    assert not all(whole["adherence"].values()) and whole["reading"]["shape"] == "triangle"


def test_a_window_of_a_longer_stream_scores_as_the_shorter_stream(pipe):
    """The first second of a 2-s stream is the 1-s stream (same seed), so its window reads the same."""
    prompts = random_prompts(2, seed=5)
    short, _ = evaluate_adherence(pipe, prompts, 1.0, seed=0)
    _, samples = evaluate_adherence(pipe, prompts, 2.0, seed=0)
    assert [len(s) for s in samples] == [32, 32]
    assert score_streams(prompts, samples, 1.0) == short


@pytest.mark.parametrize("window", ["0.5", "5"])
def test_a_window_outside_the_stream_is_a_value_error(window):
    from streamdit.evaluate import main

    with pytest.raises(ValueError, match=f"--windows {window}"):
        main(["--seconds", "4", "--windows", window])


def test_results_break_adherence_down_by_shape_and_speed():
    from streamdit.evaluate import breakdown_markdown, by_shape_and_speed

    def row(prompt, right):
        return {"prompt": prompt, "adherence": {"shape": right, "colour": True}}

    rows = [row("a red square moving left quickly", True), row("a red square moving up quickly", False),
            row("a blue square moving left quickly on a gray background", False), row("a red circle moving left", True)]
    cells = by_shape_and_speed(rows)
    assert cells == {"square quickly": [1, 3], "circle normal": [1, 1]}  # no speed word: the normal 2 px a frame
    table = breakdown_markdown(cells).splitlines()
    assert table[0] == "| shape | slowly | normal | quickly |"
    assert table[2:] == ["| circle | - | 1 / 1 | - |", "| square | - | - | 1 / 3 |", "| triangle | - | - | - |"]


def test_the_evaluation_command_writes_its_tables(pipe, tmp_path):
    import json

    from streamdit.evaluate import main

    pipe.save_pretrained(tmp_path / "model")
    main(["--model", str(tmp_path / "model"), "--prompts", "3", "--seconds", "1", "--drift-prompts", "0",
          "--switches", "0", "--out", str(tmp_path / "eval")])
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["results"]["prompts"] == 3 and len(saved["rows"]) == 3
    assert sum(streams for _, streams in saved["by_shape_and_speed"].values()) == 3
    report = (tmp_path / "eval" / "results.md").read_text()
    assert "| all_attributes |" in report and "| shape | slowly | normal | quickly |" in report
    assert (tmp_path / "eval" / "samples.gif").exists()
    low, high = saved["results"]["all_attributes_ci95_low"], saved["results"]["all_attributes_ci95_high"]
    assert 0.0 <= low <= saved["results"]["all_attributes"] <= high <= 1.0 and high - low > 0.3  # 3 streams say little
    # against an earlier run of the same prompts (here: itself), pair by pair
    main(["--model", str(tmp_path / "model"), "--prompts", "3", "--seconds", "1", "--drift-prompts", "0",
          "--switches", "0", "--out", str(tmp_path / "again"), "--compare", str(tmp_path / "eval" / "results.json")])
    again = (tmp_path / "again" / "results.md").read_text()
    assert "Paired with" in again and "right only here" in again and "p = 1.000" in again  # seeded: the same streams
    # another seed's prompts are refused before anything streams
    with pytest.raises(ValueError, match="stream 0 is"):
        main(["--model", str(tmp_path / "model"), "--prompts", "3", "--seed", "7", "--drift-prompts", "0",
              "--switches", "0", "--out", str(tmp_path / "other"), "--compare", str(tmp_path / "eval" / "results.json")])
    assert not (tmp_path / "other").exists()


def test_wilson_interval_matches_the_score_formula_and_stays_in_bounds():
    from streamdit.evaluate import wilson_interval

    # by hand: p = 0.84, n = 100, z = 1.96: centre (p + z^2/2n) / (1 + z^2/n), half-width z/(1 + z^2/n) sqrt(...)
    z2 = 1.96**2
    centre = (0.84 + z2 / 200) / (1 + z2 / 100)
    half = 1.96 / (1 + z2 / 100) * (0.84 * 0.16 / 100 + z2 / 40000) ** 0.5
    low, high = wilson_interval(84, 100)
    assert low == pytest.approx(centre - half) and high == pytest.approx(centre + half)
    assert (round(low, 3), round(high, 3)) == (0.756, 0.899)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    for bad in ((5, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError, match=f"successes={bad[0]} of count={bad[1]}"):
            wilson_interval(*bad)


def test_paired_comparison_counts_streams_pair_by_pair_with_mcnemars_exact_p():
    from streamdit.evaluate import paired_comparison

    def rows(rights):
        return [{"prompt": f"prompt {i}", "adherence": {"shape": r, "colour": True}} for i, r in enumerate(rights)]

    this = rows([True] * 6 + [True] * 3 + [False] * 1)
    other = rows([False] * 6 + [True] * 3 + [False] * 1)
    c = paired_comparison(this, other)
    # 6 streams only this one got right, none the other: two-sided exact binomial 2 * (1/2)^6
    assert c == {"streams": 10, "both": 3, "only_this": 6, "only_other": 0, "neither": 1, "p_value": 2 / 64}
    assert paired_comparison(other, this)["only_other"] == 6
    # a 2-2 split of the discordant streams is as even as it gets: p = 1; none at all: p = 1
    assert paired_comparison(rows([True, True, False, False]), rows([False, False, True, True]))["p_value"] == 1.0
    assert paired_comparison(this, this)["p_value"] == 1.0
    # 5 against 1: 2 * (C(6,0) + C(6,1)) / 2^6
    assert paired_comparison(rows([True] * 5 + [False]), rows([False] * 5 + [True]))["p_value"] == pytest.approx(14 / 64)
    with pytest.raises(ValueError, match="10 streams against 9"):
        paired_comparison(this, other[:9])
    moved = other[:4] + [{**other[4], "prompt": "a red circle moving left"}] + other[5:]
    with pytest.raises(ValueError, match="stream 4 is 'prompt 4' in one and 'a red circle moving left'"):
        paired_comparison(this, moved)


def test_the_evaluation_command_compares_two_results_files(tmp_path, capsys):
    import json

    from streamdit.evaluate import main

    def write(name, rights):
        rows = [{"prompt": f"prompt {i}", "adherence": {"shape": r}} for i, r in enumerate(rights)]
        (tmp_path / name).write_text(json.dumps({"rows": rows}))
        return str(tmp_path / name)

    a, b = write("a.json", [True] * 8 + [False] * 2), write("b.json", [True] * 3 + [False] * 7)
    main(["--compare", a, b])
    report = capsys.readouterr().out
    assert f"| {a} | 80% |" in report and f"| {b} | 30% |" in report
    assert "right only here" in report and "p = 0.062" in report  # 5 against 0: 2 / 32
    assert not (tmp_path / "eval").exists() and not list(tmp_path.glob("*.md"))  # nothing streamed, nothing written
    with pytest.raises(ValueError, match="--compare takes one results.json"):
        main(["--compare", a, b, a])
    with pytest.raises(ValueError, match=f"--compare {tmp_path / 'missing.json'}: not an evaluation's results.json"):
        main(["--compare", a, str(tmp_path / "missing.json")])
