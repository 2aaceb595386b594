"""Statistical checks that int8, lowbit, topk's int8 values and rescaled randk
are unbiased.

Each test averages many decodes of one fixed tensor and compares the mean to
the tensor, with a tolerance of 5 standard errors computed from the codec's
known variance, so a false failure has probability below about 1e-5 per test.
A codec that rounds to nearest, or forgets the d / k factor, is off by many
standard errors and fails.
"""

import numpy as np

from medfed.contract.codecs import get_codec

TRIALS = 2000
# Values sitting 0.3 and 0.7 of a step between integers: rounding to nearest
# would be off by 0.3 of a step on each, 13 standard errors at this count.
STEP = 1.0 / 127
VALUES = (
    np.array(
        [0.3, 0.7, -0.3, -0.7, 10.3, -55.7, 100.5, 126.9, 127.0, 0.0], dtype=np.float64
    )
    * STEP
)


def mean_decoded(name: str, params: dict, values: np.ndarray) -> np.ndarray:
    """Return the mean over TRIALS seeds of ``values`` encoded and decoded."""
    specs = [("w", (values.size,), "float32")]
    total = np.zeros(values.size)
    for seed in range(TRIALS):
        codec = get_codec(name, {**params, "seed": seed})
        total += codec.decode(codec.encode({"w": values}), specs)["w"]
    return total / TRIALS


def test_int8_stochastic_rounding_unbiased():
    update = {"w": VALUES.astype(np.float32)}
    specs = [("w", (VALUES.size,), "float32")]
    total = np.zeros(VALUES.size)
    for seed in range(TRIALS):
        codec = get_codec("int8", {"scale": STEP, "seed": seed})
        total += codec.decode(codec.encode(update), specs)["w"]
    mean = total / TRIALS
    # Stochastic rounding has variance at most scale**2 / 4 per element.
    tolerance = 5 * (STEP / 2) / np.sqrt(TRIALS)
    bias = np.abs(mean - update["w"].astype(np.float64))
    assert (bias <= tolerance).all(), f"bias {bias.max()} > {tolerance}"


def test_int8_per_tensor_scale_unbiased():
    values = np.array([0.003, -0.4, 0.51, 1.0, -0.99], dtype=np.float32)
    scale = 1.0 / 127
    bias = np.abs(mean_decoded("int8", {}, values) - values.astype(np.float64))
    assert (bias <= 5 * (scale / 2) / np.sqrt(TRIALS)).all()


def test_int8_step_rms_unbiased():
    # The rms is about 0.64, so the step is about 0.64 and 0.3 falls between
    # the levels 0 and 1. Rounding to nearest would be off by 0.3, about 40
    # standard errors.
    values = np.array([0.3, -0.7, 0.5, 1.0, -1.0, 0.0, 0.05], dtype=np.float32)
    scale = float(np.sqrt(np.mean(values.astype(np.float64) ** 2)))
    mean = mean_decoded("int8", {"step_rms": 1.0}, values)
    bias = np.abs(mean - values.astype(np.float64))
    assert (bias <= 5 * (scale / 2) / np.sqrt(TRIALS)).all()


def test_lowbit_two_bits_unbiased():
    # The scale is max|x| = 1, so the levels are -1, 0 and 1 and rounding to
    # nearest would be off by 0.3 on 0.3 and -0.7, 27 standard errors.
    values = np.array([0.3, -0.7, 0.5, 1.0, -1.0, 0.0, 0.05], dtype=np.float32)
    mean = mean_decoded("lowbit", {"bits": 2}, values)
    bias = np.abs(mean - values.astype(np.float64))
    assert (bias <= 5 * (1.0 / 2) / np.sqrt(TRIALS)).all()


def test_topk_int8_values_unbiased():
    # Half the values are kept, the largest five; their scale is 1 / 127.
    kept = np.array([1.0, -0.5, 0.3 * STEP, 0.7 * STEP + 0.25, -0.9])
    values = np.concatenate([kept, [0.1 * STEP] * 5]).astype(np.float32)
    specs = [("w", (values.size,), "float32")]
    total = np.zeros(values.size)
    for seed in range(TRIALS):
        params = {"fraction": 0.5, "value_dtype": "int8", "seed": seed}
        codec = get_codec("topk", params | {"index_encoding": "bitmap"})
        total += codec.decode(codec.encode({"w": values}), specs)["w"]
    bias = np.abs(total[:5] / TRIALS - values[:5].astype(np.float64))
    assert (bias <= 5 * (STEP / 2) / np.sqrt(TRIALS)).all()
    assert (total[5:] == 0).all()


def test_randk_rescaled_unbiased():
    values = np.linspace(-1.0, 1.0, 20)
    update = {"w": values.astype(np.float32)}
    specs = [("w", (values.size,), "float32")]
    total = np.zeros(values.size)
    for seed in range(TRIALS):
        codec = get_codec("randk", {"fraction": 0.1, "seed": seed})
        total += codec.decode(codec.encode(update), specs)["w"]
    # Each element is x * d / k with probability k / d, else 0: the variance
    # of one decode is x**2 * (d / k - 1).
    standard_error = np.abs(values) * np.sqrt(10 - 1) / np.sqrt(TRIALS)
    bias = np.abs(total / TRIALS - values)
    assert (bias <= 5 * standard_error + 1e-6).all()


def test_randk_positions_uniform():
    counts = np.zeros(20)
    for seed in range(TRIALS):
        codec = get_codec("randk", {"fraction": 0.1, "seed": seed, "rescale": False})
        payload = codec.encode({"w": np.arange(1, 21, dtype=np.float32)})
        counts[payload["w.values"].astype(int) - 1] += 1
    # Each position is kept with probability 0.1: binomial(2000, 0.1).
    expected = TRIALS * 0.1
    assert (np.abs(counts - expected) <= 5 * np.sqrt(TRIALS * 0.1 * 0.9)).all()
