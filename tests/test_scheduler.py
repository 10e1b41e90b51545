"""The partition, the buffer's noise levels and the flow-matching maths (paper Sec. 3)."""

import pytest
import torch

from streamdit import Partition, StreamBuffer, StreamDiTScheduler

# (B, K, c, s): uniform, diagonal, StreamDiT (the paper's teacher and student shapes) and one with reference frames
PARTITIONS = {
    "uniform": (8, 0, 8, 6),
    "diagonal": (8, 0, 1, 1),
    "streamdit": (8, 0, 2, 3),
    "student": (16, 0, 2, 1),
    "reference": (10, 2, 4, 2),
}


@pytest.mark.parametrize("name", PARTITIONS)
def test_released_frames_took_exactly_T_steps_and_end_clean(name):
    b, k, c, s = PARTITIONS[name]
    scheduler = StreamDiTScheduler(buffer_frames=b, chunk_size=c, micro_steps=s, reference_frames=k, shift=3.0)
    partition = scheduler.partition()
    taus = scheduler.taus(partition)
    # Constant velocity 1 from X = 0: a frame's value is the sum of its dtau, so 1 exactly when it went 0 -> 1.
    buffer = StreamBuffer(torch.zeros(1, 1, b, 1, 1), partition, taus)
    steps = torch.zeros(b, dtype=torch.long)  # a shadow count of the steps each frame took
    released, released_steps = [], []
    for _ in range(partition.num_steps + 5 * s):
        tau, next_tau = buffer.tau(), buffer.next_tau()
        assert (tau[:-1] >= tau[1:]).all(), "tau must not increase towards the noisy end of the buffer"
        steps += (next_tau > tau).long()
        buffer.update(scheduler.step(torch.ones_like(buffer.latents), buffer.latents, tau, next_tau).prev_sample)
        if buffer.chunk_done():
            assert torch.equal(buffer.tau()[k : k + c], torch.ones(c))
            released_steps.append(steps[k : k + c].clone())
            steps = torch.cat([steps[c:], torch.zeros(c, dtype=torch.long)])
            released.append(buffer.release(torch.zeros(1, 1, c, 1, 1)).flatten())
    assert len(released) == 6  # the first after T micro steps (start-up), then one every s
    for values, count in zip(released, released_steps):
        torch.testing.assert_close(values, torch.ones(c), atol=1e-6, rtol=0)
        assert (count == partition.num_steps).all()


def test_reference_frames_stay_clean():
    scheduler = StreamDiTScheduler(buffer_frames=10, chunk_size=4, micro_steps=2, reference_frames=2)
    partition = scheduler.partition()
    buffer = StreamBuffer(torch.zeros(1, 1, 10, 1, 1), partition, scheduler.taus(partition))
    for _ in range(partition.num_steps):
        buffer.update(buffer.latents)
    assert buffer.chunk_done()
    buffer.release(torch.zeros(1, 1, 4, 1, 1))
    assert torch.equal(buffer.tau()[:2], torch.ones(2)) and torch.equal(buffer.next_tau()[:2], torch.ones(2))


def test_caps_layout():
    # K = 1, N = 3, c = 2, s = 2: reference at T = 6, then chunks topping out at 6, 4, 2
    assert Partition(1, 3, 2, 2).caps().tolist() == [6, 6, 6, 4, 4, 2, 2]


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(buffer_frames=16, chunk_size=3), "c=3"),
        (dict(buffer_frames=16, chunk_size=0), "c=0"),
        (dict(buffer_frames=8, chunk_size=2, reference_frames=8), "K=8"),
        (dict(micro_steps=0), "micro_steps"),
        (dict(reference_frames=-1, chunk_size=16), "K=-1"),
        (dict(shift=0.0), "shift=0.0"),
        (dict(sigma_min=1.0), r"sigma_min=1\.0"),
        (dict(sigma_min=-0.1), r"sigma_min=-0\.1"),
        (dict(buffer_frames=16.0), r"buffer_frames=16\.0"),  # not N = 8.0, which only follows from it
        (dict(buffer_frames="16"), "buffer_frames='16'"),
        (dict(reference_frames=2.0), r"reference_frames=2\.0"),
        (dict(reference_frames=True), "reference_frames=True"),
        (dict(chunk_size=2.0), r"c=2\.0"),
        (dict(micro_steps=1.5), r"micro_steps=1\.5"),
    ],
)
def test_impossible_partition_raises(options, message):
    with pytest.raises(ValueError, match=message):
        StreamDiTScheduler(**options)


@pytest.mark.parametrize("field", ["reference_frames", "num_chunks", "chunk_size", "micro_steps"])
def test_partition_values_must_be_integers(field):
    values = dict(reference_frames=0, num_chunks=4, chunk_size=2, micro_steps=1) | {field: 2.0}
    with pytest.raises(ValueError, match=rf"{field}=2\.0 must be an integer"):
        Partition(**values)


def test_buffer_latents_must_fill_the_partition():
    with pytest.raises(ValueError, match="latents of 7 frames do not fill a buffer of 8"):
        StreamBuffer(torch.zeros(1, 1, 7, 1, 1), Partition(0, 4, 2, 1), torch.linspace(0, 1, 5))


def test_partition_overrides_are_validated():
    scheduler = StreamDiTScheduler(buffer_frames=16)
    with pytest.raises(ValueError, match="c=5"):
        scheduler.partition(chunk_size=5)
    assert scheduler.partition(chunk_size=16, micro_steps=8) == Partition(0, 1, 16, 8)  # uniform, T = 8
    assert scheduler.partition(chunk_size=1).num_steps == 16  # diagonal, T = N


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_tau_grid(shift):
    scheduler = StreamDiTScheduler(shift=shift)
    partition = scheduler.partition(chunk_size=2, micro_steps=4)
    taus = scheduler.taus(partition)
    assert taus.shape == (partition.num_steps + 1,)
    assert taus[0] == 0 and taus[-1] == 1 and (taus[1:] > taus[:-1]).all()
    if shift > 1:  # as SD3: more of the steps at high noise
        assert (taus[1:-1] < torch.linspace(0, 1, partition.num_steps + 1)[1:-1]).all()
    partial = scheduler.taus(partition, strength=0.4)
    assert partial[-1] == 1 and partial[0] == pytest.approx(float(scheduler.shift_tau(torch.tensor(0.6))))
    with pytest.raises(ValueError, match="strength=0"):
        scheduler.taus(partition, strength=0)


@pytest.mark.parametrize("chunk_size", [1, 2, 4, 16])
def test_sample_tau_follows_eq8(chunk_size):
    scheduler = StreamDiTScheduler(buffer_frames=16, shift=2.0)
    partition = scheduler.partition(chunk_size=chunk_size)
    tau = scheduler.sample_tau(partition, 512, torch.Generator().manual_seed(0))  # (512, 16)
    n = partition.num_chunks
    u = 1 - (1 - tau.double()) / (2.0 - (1 - tau.double()))  # undo the shift: sigma = s' / (shift - (shift - 1) s')
    chunks = u.view(512, n, chunk_size)
    assert torch.equal(chunks, chunks[..., :1].expand_as(chunks)), "a chunk shares one tau"
    for i in range(n):  # chunk i (0 = cleanest) lies in segment [(N - 1 - i) / N, (N - i) / N]
        values = chunks[:, i, 0]
        assert values.min() >= (n - 1 - i) / n - 1e-6 and values.max() <= (n - i) / n + 1e-6
        assert values.max() - values.min() > 0.8 / n  # and covers it
    assert (tau[:, :-1] >= tau[:, 1:]).all()


def test_training_partitions_are_the_mixed_set():
    sizes = [p.chunk_size for p in StreamDiTScheduler(buffer_frames=16).training_partitions()]
    assert sizes == [1, 2, 4, 8, 16]
    assert [p.chunk_size for p in StreamDiTScheduler(buffer_frames=12).training_partitions()] == [1, 2, 4, 12]


def _eq5_inputs(seed):
    """Data X1 and noise X0 (2, 3, 4, 2, 2), and per-frame levels (2, 4) from pure noise to data."""
    g = torch.Generator().manual_seed(seed)
    x1, x0 = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    return x1, x0, torch.tensor([[1.0, 0.7, 0.3, 0.0], [0.9, 0.9, 0.5, 0.5]])


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_noised_sample_and_velocity_follow_eq5(sigma_min):
    scheduler = StreamDiTScheduler(sigma_min=sigma_min)
    x1, x0, tau = _eq5_inputs(0)
    x = scheduler.add_noise(x1, x0, tau)
    torch.testing.assert_close(x[0, :, 3], x0[0, :, 3])  # tau = 0 is pure noise
    torch.testing.assert_close(x[0, :, 0], x1[0, :, 0] + sigma_min * x0[0, :, 0])  # tau = 1 is data (+ sigma_min X0)
    eps = 1e-3  # the velocity is dX/dtau along the path
    finite_difference = (scheduler.add_noise(x1, x0, tau + eps) - x) / eps
    torch.testing.assert_close(finite_difference, scheduler.velocity(x1, x0).expand_as(x), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("sigma_min", [0.0, 0.1])
def test_clean_estimate_of_the_true_velocity_is_the_data(sigma_min):
    scheduler = StreamDiTScheduler(sigma_min=sigma_min)
    x1, x0, tau = _eq5_inputs(1)
    x, v = scheduler.add_noise(x1, x0, tau), scheduler.velocity(x1, x0)
    torch.testing.assert_close(scheduler.clean_estimate(x, v, tau), x1)
    shared = scheduler.add_noise(x1, x0, tau[1])  # one (F,) row of levels for the whole batch
    torch.testing.assert_close(scheduler.clean_estimate(shared, v, tau[1]), x1)
    assert not torch.allclose(scheduler.clean_estimate(x, v + 0.1, tau), x1)


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_renoise_takes_frames_back_along_the_forward_process(sigma_min):
    # Many X_tau of one X1, taken back to new_tau, must be distributed as Eq. 5 at new_tau: mean new_tau X1 and
    # noise std 1 - (1 - sigma_min) new_tau. Frames whose tau does not change stay as they are.
    scheduler = StreamDiTScheduler(sigma_min=sigma_min)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(1, 1, 4, 1, 1, generator=g).expand(40000, 1, 4, 1, 1)
    tau, new_tau = torch.tensor([0.9, 0.6, 0.3, 0.0]), torch.tensor([0.5, 0.0, 0.3, 0.0])
    x = scheduler.add_noise(x1, torch.randn(x1.shape, generator=g), tau)
    back = scheduler.renoise(x, tau, new_tau, torch.randn(x1.shape, generator=g))
    mean, std = back.mean(0).flatten(), back.std(0).flatten()
    torch.testing.assert_close(mean[:2], new_tau[:2] * x1[0].flatten()[:2], atol=0.02, rtol=0)
    torch.testing.assert_close(std[:2], 1 - (1 - sigma_min) * new_tau[:2], atol=0.02, rtol=0)
    assert torch.equal(back[:, :, 2:], x[:, :, 2:])


def test_take_back_lowers_levels_and_delays_the_next_release():
    scheduler = StreamDiTScheduler(buffer_frames=10, chunk_size=2, micro_steps=2, reference_frames=2)  # N 4, T 8
    partition = scheduler.partition()
    buffer = StreamBuffer(torch.zeros(1, 1, 10, 1, 1), partition, scheduler.taus(partition))
    for _ in range(partition.num_steps):
        buffer.update(buffer.latents)
    buffer.release(torch.zeros(1, 1, 2, 1, 1))
    assert buffer.levels.tolist() == [8, 8, 6, 6, 4, 4, 2, 2, 0, 0]
    seen = []
    buffer.take_back(3, lambda latents, tau, new_tau: seen.append((tau, new_tau)) or latents + 1)
    assert buffer.levels.tolist() == [8, 8, 3, 3, 1, 1, 0, 0, 0, 0]  # reference frames stay clean
    assert torch.equal(seen[0][0], buffer.taus[torch.tensor([8, 8, 6, 6, 4, 4, 2, 2, 0, 0])])
    assert torch.equal(seen[0][1], buffer.tau()) and torch.equal(buffer.latents, torch.ones(1, 1, 10, 1, 1))
    steps = 0
    while not buffer.chunk_done():
        buffer.update(buffer.latents)
        steps += 1
    assert steps == partition.micro_steps + 3
