"""BatchAugment, the batched device-side augmentation, against the per-image torchvision pipeline
it stands in for: exactly for evaluation and for each op with given parameters, in distribution
(two-sample Kolmogorov-Smirnov tests) for the random draws."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as F

from thaw.data.augment import batch as batch_augment
from thaw.data.augment.batch import BatchAugment, check_batchable, jitter_colors, unsupported
from thaw.data.augment.options import AugmentOptions
from thaw.data.augment.per_image import build_train_transform
from thaw.preprocess import Preprocessing

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
RAW = [0.0, 0.0, 0.0], [1 / 255] * 3  # normalising with these gives back the pixel values
BASIC = {"crop_padding": 0.125, "hflip": 0.5, "color_jitter": 0.4}
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]

# Two-sample KS test of N against N draws at alpha = 0.001 (asymptotic critical value).
N = 2000
KS_CRITICAL = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt(2 / N)


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator)


def augment(
    options: dict, images: torch.Tensor, seed: int, normalise: tuple[list, list] = (MEAN, STD)
) -> torch.Tensor:
    """Training augmentation of square `images` at their own size."""
    generator = torch.Generator(images.device).manual_seed(seed)
    preprocessing = Preprocessing(images.shape[-1], *normalise)
    return BatchAugment(options, preprocessing, train=True)(images, generator)


def geometry(options: dict, image: torch.Tensor, copies: int) -> torch.Tensor:
    """`copies` augmented copies of `image` as uint8 again: for crop and flip, exact pixels."""
    out = augment(options, image.expand(copies, -1, -1, -1), seed=0, normalise=RAW)
    return out.round().to(torch.uint8)


def windows(padded: torch.Tensor, size: int) -> torch.Tensor:
    """Every size x size window of a (C, H, W) image, as (offsets, C, size, size), row-major."""
    return padded.unfold(1, size, 1).unfold(2, size, 1).permute(1, 2, 0, 3, 4).flatten(0, 1)


def matches(outputs: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """(B, K): whether output b equals candidate k exactly."""
    return (outputs[:, None] == candidates[None]).flatten(2).all(2)


# ---------------------------------------------------------------- shapes, eval, determinism


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    ("height", "width", "input_size", "resize_size"),
    [(20, 20, 20, None), (20, 30, 16, None), (20, 30, 40, None), (20, 30, 16, 24)],
    ids=["native", "smaller", "larger", "resize-then-crop"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_eval_path_equals_the_per_image_eval_transform(
    device: str, height: int, width: int, input_size: int, resize_size: int | None, channels: int
) -> None:
    images = random_images(5, channels, height, width).to(device)
    preprocessing = Preprocessing(input_size, MEAN, STD, resize_size=resize_size)
    per_image = preprocessing.transform()
    expected = torch.stack([per_image(image) for image in images])
    out = BatchAugment(BASIC, preprocessing, train=False)(images)
    assert out.dtype == torch.float32 and out.device == images.device
    assert out.shape == (5, 3, input_size, input_size)
    # Exact even when resizing: both resize the uint8 images with torchvision's uint8 kernel.
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    if (height, width, resize_size) == (input_size, input_size, None):
        # At the images' own size nothing is resized or cropped: only scaled and normalised.
        mean, std = (torch.tensor(v, device=device).view(3, 1, 1) for v in (MEAN, STD))
        plain = (images.float() / 255).expand(-1, 3, -1, -1).sub(mean).div(std)
        torch.testing.assert_close(out, plain, atol=1e-6, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_training_output_shape_dtype_and_range(device: str) -> None:
    images = random_images(8, 1, 20, 30).to(device)
    generator = torch.Generator(device).manual_seed(0)
    transform = BatchAugment(BASIC, Preprocessing(16, MEAN, STD), train=True)
    out = transform(images, generator)
    assert out.shape == (8, 3, 16, 16) and out.dtype == torch.float32
    assert transform(images[:0], generator).shape == (0, 3, 16, 16)
    assert out.device == images.device
    mean, std = torch.tensor(MEAN, device=device), torch.tensor(STD, device=device)
    pixels = out * std.view(3, 1, 1) + mean.view(3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_batch_other_seed_other_batch(device: str) -> None:
    images = random_images(16, 3, 12, 12).to(device)
    first, again = augment(BASIC, images, seed=1), augment(BASIC, images, seed=1)
    assert torch.equal(first, again)
    assert not torch.equal(first, augment(BASIC, images, seed=2))


def test_bad_input_and_missing_generator_raise() -> None:
    train = BatchAugment(BASIC, Preprocessing(8, MEAN, STD), train=True)
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="uint8"):
        train(torch.zeros(2, 3, 8, 8), generator)
    with pytest.raises(ValueError, match="1 or 3"):
        train(torch.zeros(2, 4, 8, 8, dtype=torch.uint8), generator)
    with pytest.raises(ValueError, match="generator"):
        train(torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
    # The statistics and sizes a BatchAugment is given are checked by its Preprocessing.
    with pytest.raises(ValueError, match="std must be positive"):
        Preprocessing(8, MEAN, [0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="input_size"):
        Preprocessing(input_size=0, mean=MEAN, std=STD)


def test_unsupported_lists_the_per_image_only_keys() -> None:
    assert unsupported(None) == []
    assert unsupported({**BASIC, "mixup_alpha": 0.2, "cutmix_alpha": 1.0}) == []
    assert unsupported({**BASIC, "random_erasing": 0.25}) == []
    assert unsupported({**BASIC, "policy": "randaugment", "random_erasing": 0.25}) == []
    options = AugmentOptions.parse({**BASIC, "policy": "autoaugment", "random_erasing": 0.25})
    assert unsupported(options) == ["policy=autoaugment"]
    with pytest.raises(ValueError, match=r"policy=autoaugment.*data\.loader=dataloader"):
        BatchAugment(options, Preprocessing(8, MEAN, STD), train=True)
    BatchAugment(options, Preprocessing(8, MEAN, STD), train=False)  # evaluation never augments


def test_check_batchable_raises_naming_the_per_image_only_keys() -> None:
    check_batchable(None)
    check_batchable({**BASIC, "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "random_erasing": 0.25})
    for options, keys in [
        ({"policy": "trivialaugment"}, r"policy=trivialaugment only"),
        ({"policy": "autoaugment", "random_erasing": 0.5}, r"policy=autoaugment only"),
    ]:
        with pytest.raises(ValueError, match=keys + r".*data\.loader=dataloader"):
            check_batchable(AugmentOptions.parse(options))


# ---------------------------------------------------------------- each op, exactly


def test_crop_and_flip_give_a_window_of_the_zero_padded_image() -> None:
    """crop_padding 0.25 of 8 pads 2: each output is one of the 25 windows, mirrored when
    flipped, and every window and both flips turn up among 1000 copies of one image."""
    image = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(3, 8, 8)  # every pixel unique
    options = {"crop_padding": 0.25, "hflip": 0.5}
    out = geometry(options, image, 1000)
    crops = windows(torch.nn.functional.pad(image, [2, 2, 2, 2]), 8)
    found = matches(out, torch.cat([crops, crops.flip(-1)]))
    assert (found.sum(1) == 1).all()
    assert found.any(0).all()


def test_crop_alone_shifts_and_flip_alone_mirrors() -> None:
    image = random_images(3, 10, 10)
    shifted = geometry({"crop_padding": 0.1}, image, 400)  # pads round(1.0) = 1: 9 windows
    found = matches(shifted, windows(torch.nn.functional.pad(image, [1, 1, 1, 1]), 10))
    assert (found.sum(1) == 1).all() and found.any(0).all()

    flipped = geometry({"hflip": 0.3}, image, 4000)
    is_flipped = matches(flipped, image.flip(-1)[None])[:, 0]
    assert (is_flipped | matches(flipped, image[None])[:, 0]).all()
    assert abs(is_flipped.float().mean().item() - 0.3) < 4 * math.sqrt(0.3 * 0.7 / 4000)


def test_colour_jitter_is_torchvisions_for_given_factors_and_order() -> None:
    """All six orders: float torchvision exactly; uint8 torchvision within its truncation after
    each op (up to 4 levels, darker on average). The image saturates, so the order matters."""
    image = random_images(3, 10, 10)
    orders = torch.tensor(list(itertools.permutations(range(3)))).repeat(50, 1)
    factors = torch.rand(len(orders), 3, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.6
    images = image.float().div(255).expand(len(orders), -1, -1, -1)
    out = jitter_colors(images, factors, orders)
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation]

    def torchvision(image: torch.Tensor, factors: torch.Tensor, order: torch.Tensor):
        for op in order.tolist():
            image = ops[op](image, factors[op].item())
        return image

    expected = [
        torchvision(image.float() / 255, f, o) for f, o in zip(factors, orders, strict=True)
    ]
    torch.testing.assert_close(out, torch.stack(expected), atol=1e-6, rtol=0)
    in_uint8 = torch.stack([torchvision(image, f, o) for f, o in zip(factors, orders, strict=True)])
    assert (in_uint8 - out * 255).abs().max() <= 4
    one_order = jitter_colors(images, factors, orders[:1].expand_as(orders))
    assert (one_order - out).abs().max() > 0.05


@pytest.mark.parametrize("strength", [0.4, 1.5])
def test_jitter_draws_factors_and_orders_per_sample(
    monkeypatch: pytest.MonkeyPatch, strength: float
) -> None:
    """Factors uniform in [max(0, 1 - s), 1 + s], and every order of the three adjustments equally
    likely. Checked here because the distribution test below cannot see the order: short of
    clamping, the three blends commute."""
    drawn = {}

    def capture(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor):
        drawn.update(factors=factors, order=order)
        return images

    monkeypatch.setattr(batch_augment, "jitter_colors", capture)
    augment({"color_jitter": strength}, random_images(6000, 3, 2, 2), seed=0)
    low, high = max(0.0, 1 - strength), 1 + strength
    factors = drawn["factors"]
    assert low <= factors.min() < low + 0.01 and high - 0.01 < factors.max() <= high
    assert abs(factors.mean().item() - (low + high) / 2) < 0.01 * (high - low)
    orders, counts = drawn["order"].unique(dim=0, return_counts=True)
    assert orders.tolist() == [list(order) for order in itertools.permutations(range(3))]
    assert (counts - 1000).abs().max() < 4 * math.sqrt(6000 * 1 / 6 * 5 / 6)


# ---------------------------------------------------------------- distribution


def marker_image() -> torch.Tensor:
    """3x12x12 gradients (a different one per channel) with a white marker at (3, 3): the
    brightest pixel under any jitter, always in the window, and in columns 1..5 unflipped but
    6..10 flipped (crop_padding 0.125 pads 2)."""
    rows, columns = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    image = torch.stack([60 + 5 * columns, 70 + 4 * rows, 90 + rows + columns])
    image[:, 3, 3] = 255
    return image.to(torch.uint8)


def statistics(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: mean of each channel, contrast (std of the luminance), the marker's row and
    column, and whether it was flipped; `out` normalised with MEAN, STD."""
    pixels = out.double() * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    luminance = torch.einsum("bchw,c->bhw", pixels, torch.tensor([0.2989, 0.587, 0.114]).double())
    marker = luminance.flatten(1).argmax(1)
    row, column = marker // 12, marker % 12
    means = pixels.mean((2, 3)).unbind(1)
    return {
        **dict(zip(["red", "green", "blue"], means, strict=True)),
        "contrast": luminance.std((1, 2)),
        "row": row.double(),
        "column": column.double(),
        "flipped": (column >= 6).double(),
    }


def ks_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.sort().values, b.sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.fixture(scope="module")
def per_image() -> dict[str, torch.Tensor]:
    """N draws of build_train_transform(BASIC). The image goes in as float in [0, 1], where
    torchvision's jitter does the batch path's float math: on uint8 it truncates after each op,
    darkening by ~1.3 levels on average, worth a KS distance of ~0.03 on the channel means with
    the very same draws. Crop and flip draw the same either way."""
    image = marker_image().float() / 255
    transform = build_train_transform(BASIC, Preprocessing(image.shape[-1], MEAN, STD))
    torch.manual_seed(0)
    return statistics(torch.stack([transform(image) for _ in range(N)]))


def batch_statistics(options: dict) -> dict[str, torch.Tensor]:
    return statistics(augment(options, marker_image().expand(N, -1, -1, -1), seed=1))


def test_the_batch_path_draws_the_per_image_distribution(per_image: dict) -> None:
    batch = batch_statistics(BASIC)
    distances = {name: ks_distance(per_image[name], batch[name]) for name in per_image}
    assert max(distances.values()) < KS_CRITICAL, distances


@pytest.mark.parametrize(
    ("wrong", "statistic"),
    [({"hflip": 0.2}, "flipped"), ({"color_jitter": 0.2}, "red"), ({"crop_padding": 0.08}, "row")],
)
def test_the_distribution_test_catches_a_wrong_configuration(
    per_image: dict, wrong: dict, statistic: str
) -> None:
    batch = batch_statistics({**BASIC, **wrong})
    assert ks_distance(per_image[statistic], batch[statistic]) > KS_CRITICAL


# ---------------------------------------------------------------- random erasing

ERASE = {"random_erasing": 0.5}


def gray_image() -> torch.Tensor:
    """A flat 12x12 image whose normalised pixels are nowhere 0, so 0 marks what was erased."""
    return torch.full((3, 12, 12), 200, dtype=torch.uint8)


def erased_rectangles(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image: whether anything was erased (0, the mean colour, in every channel), and the
    erased rows' and columns' first index and count (0 where nothing was)."""
    erased = (out == 0).all(1)
    rows, columns = erased.any(2), erased.any(1)
    assert torch.equal(erased.sum((1, 2)), rows.sum(1) * columns.sum(1))  # one rectangle each

    def first(lines: torch.Tensor) -> torch.Tensor:
        return lines.to(torch.uint8).argmax(1).double()

    return {
        "erased": erased.flatten(1).any(1).double(),
        "top": first(rows),
        "left": first(columns),
        "height": rows.sum(1).double(),
        "width": columns.sum(1).double(),
    }


def test_random_erasing_sets_a_rectangle_to_the_mean_colour_and_leaves_the_rest() -> None:
    image = random_images(3, 12, 12)
    out = augment({"random_erasing": 1.0}, image.expand(200, -1, -1, -1), seed=0)
    plain = Preprocessing(12, MEAN, STD).transform()(image)
    erased = (out == 0).all(1)
    assert erased.flatten(1).any(1).all()  # p = 1: every image has its rectangle
    assert torch.equal(
        out.masked_fill(erased[:, None], 0), plain.expand_as(out).masked_fill(erased[:, None], 0)
    )
    rectangles = erased_rectangles(out)
    assert rectangles["height"].max() < 12 and rectangles["width"].max() < 12


@pytest.fixture(scope="module")
def erased_per_image() -> dict[str, torch.Tensor]:
    """N draws of torchvision's RandomErasing through build_train_transform."""
    transform = build_train_transform(ERASE, Preprocessing(12, MEAN, STD))
    torch.manual_seed(0)
    return erased_rectangles(torch.stack([transform(gray_image()) for _ in range(N)]))


def test_random_erasing_draws_torchvisions_rectangles(erased_per_image: dict) -> None:
    batch = erased_rectangles(augment(ERASE, gray_image().expand(N, -1, -1, -1), seed=1))
    distances = {name: ks_distance(erased_per_image[name], batch[name]) for name in batch}
    assert max(distances.values()) < KS_CRITICAL, distances


def test_the_erasing_test_catches_a_wrong_probability(erased_per_image: dict) -> None:
    batch = erased_rectangles(
        augment({"random_erasing": 0.3}, gray_image().expand(N, -1, -1, -1), seed=1)
    )
    assert ks_distance(erased_per_image["erased"], batch["erased"]) > KS_CRITICAL


def test_the_erasing_test_catches_a_wrong_area(
    monkeypatch: pytest.MonkeyPatch, erased_per_image: dict
) -> None:
    monkeypatch.setattr(batch_augment, "ERASE_SCALE", (0.02, 0.15))
    batch = erased_rectangles(augment(ERASE, gray_image().expand(N, -1, -1, -1), seed=1))
    assert ks_distance(erased_per_image["height"], batch["height"]) > KS_CRITICAL


def test_randaugment_on_batches_is_torchvisions_ops_each_sample_drawing_its_own() -> None:
    """num_ops=1: every output is torchvision's own op (one of the 14, at either sign) applied
    to that very image; each op turns up about 1/14 of the time; the draws come from the
    generator alone."""
    from torchvision.transforms import v2

    from thaw.data.augment.batch_policy import BatchRandAugment

    count = 1400
    images = random_images(count, 3, 12, 12, seed=1)
    randaugment = BatchRandAugment(num_ops=1, magnitude=12)
    out = randaugment(images, torch.Generator().manual_seed(0))
    again = randaugment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and out.dtype == torch.uint8

    policy = v2.RandAugment(num_ops=1, magnitude=12)
    space = policy._AUGMENTATION_SPACE
    candidates = []  # per op and sign: torchvision's op on the whole set, image by image
    for name, (magnitudes_of, signed) in space.items():
        magnitudes = magnitudes_of(31, 12, 12)
        magnitude = 0.0 if magnitudes is None else float(magnitudes[12])
        for sign in (1, -1) if signed else (1,):
            applied = [
                policy._apply_image_or_video_transform(
                    image, name, sign * magnitude, policy.interpolation, policy._fill
                )
                for image in images
            ]
            candidates.append((name, torch.stack(applied)))
    hits = torch.stack([(out == c).flatten(1).all(1) for _, c in candidates], dim=1)
    assert hits.any(1).all()  # every output is one of torchvision's ops on its own image
    names = [name for name, _ in candidates]
    # An image is attributed to the op only that op explains (Identity and others can coincide).
    alone = hits.sum(1) == 1
    share = {name: 0 for name in space}
    for row in hits[alone].nonzero().tolist():
        share[names[row[1]]] += 1
    assert len([n for n, hit in share.items() if hit > 0]) >= 12
    expected = alone.sum().item() / len(space)
    assert max(share.values()) < 2 * expected  # no op far more common than 1/14


def test_randaugment_runs_in_the_batched_pipeline_before_jitter() -> None:
    options = {"policy": "randaugment", "num_ops": 2, "magnitude": 9}
    images = random_images(64, 3, 16, 16, seed=2)
    out = augment(options, images, seed=0, normalise=RAW)
    assert torch.equal(out, augment(options, images, seed=0, normalise=RAW))
    assert not torch.equal(out, augment(options, images, seed=1, normalise=RAW))
    changed = (out.round().to(torch.uint8) != images).flatten(1).any(1)
    assert changed.float().mean() > 0.5  # most samples drew an op that changes them
