"""A small synthetic dataset shaped like the dog one: learnable JPEG classes, some PNG, some broken.

Real dog photos cannot be downloaded where the tests and the demo run, so this makes an ImageFolder
tree with the dog dataset's layout (`train/ valid/ test/` of `NNN.Breed_name/*.jpg`). Each class is
a shape of its own colour on a noisy background with distractors, at random places, sizes and
aspect ratios: easy enough to learn from scratch in a few CPU epochs, not a constant per class.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from container.sagemaker_env import DATA_CHANNELS, OptMl, write_training_config

__all__ = ["BREEDS", "SampleSpec", "class_folders", "make_dataset", "make_opt_ml"]

BREEDS = (
    "Affenpinscher",
    "Afghan_hound",
    "Airedale_terrier",
    "Akita",
    "Alaskan_malamute",
    "American_eskimo_dog",
    "American_foxhound",
    "American_staffordshire_terrier",
    "American_water_spaniel",
    "Anatolian_shepherd_dog",
    "Australian_cattle_dog",
    "Australian_shepherd",
    "Australian_terrier",
    "Basenji",
    "Basset_hound",
    "Beagle",
)
_SHAPES = ("ellipse", "rectangle", "triangle")


@dataclass(frozen=True)
class SampleSpec:
    """What to generate: images per class per split, their size, and how many are PNG or broken."""

    classes: int = 4
    per_class: Mapping[str, int] = field(
        default_factory=lambda: {"train": 16, "valid": 6, "test": 6}
    )
    min_side: int = 64
    max_side: int = 128
    png_every: int = 5  # every 5th image is a PNG (half of those with an alpha channel)
    corrupt: Mapping[str, int] = field(default_factory=lambda: {"train": 1})
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.classes <= len(BREEDS):
            raise ValueError(f"classes must be between 2 and {len(BREEDS)}")


def class_folders(count: int) -> list[str]:
    return [f"{i + 1:03d}.{BREEDS[i]}" for i in range(count)]


def _colour(index: int, classes: int, rng: random.Random) -> tuple[int, int, int]:
    hue = (index / classes + rng.uniform(-0.03, 0.03)) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return int(r * 255), int(g * 255), int(b * 255)


def _draw_shape(
    draw: ImageDraw.ImageDraw,
    shape: str,
    box: tuple[int, int, int, int],
    fill: tuple[int, int, int],
) -> None:
    x0, y0, x1, y1 = box
    if shape == "ellipse":
        draw.ellipse(box, fill=fill)
    elif shape == "rectangle":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _image(index: int, classes: int, rng: random.Random) -> Image.Image:
    width, height = rng.randint(64, 128), rng.randint(64, 128)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(70, 150, (height, width, 3))
    image = Image.fromarray(noise.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randint(0, 2)):  # grey distractors that carry no class signal
        grey = rng.randint(40, 200)
        x, y = rng.randint(0, width - 10), rng.randint(0, height - 10)
        _draw_shape(draw, rng.choice(_SHAPES), (x, y, x + 12, y + 12), (grey, grey, grey))
    side = rng.randint(min(width, height) // 2, min(width, height) - 4)
    x, y = rng.randint(0, width - side), rng.randint(0, height - side)
    _draw_shape(draw, _SHAPES[index % 3], (x, y, x + side, y + side), _colour(index, classes, rng))
    return image


def _corrupt_bytes(kind: int, rng: random.Random) -> bytes:
    if kind % 3 == 0:  # a JPEG cut off halfway
        buffer = io.BytesIO()
        _image(0, 2, rng).save(buffer, "JPEG", quality=90)
        return buffer.getvalue()[: len(buffer.getvalue()) // 2]
    if kind % 3 == 1:  # an empty file
        return b""
    return bytes(rng.getrandbits(8) for _ in range(512))  # not an image at all


def make_dataset(root: Path, spec: SampleSpec | None = None) -> Path:
    """Write the dataset under `root` (train/, valid/, test/) and return `root`."""
    spec = spec or SampleSpec()
    rng = random.Random(spec.seed)
    folders = class_folders(spec.classes)
    for split, count in spec.per_class.items():
        for index, folder in enumerate(folders):
            target = root / split / folder
            target.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                image = _image(index, spec.classes, rng)
                scale = rng.uniform(spec.min_side, spec.max_side) / min(image.size)
                image = image.resize((round(image.width * scale), round(image.height * scale)))
                if spec.png_every and n % spec.png_every == spec.png_every - 1:
                    if n % 2:
                        image = image.convert("RGBA")
                    image.save(target / f"{folder}_{n:05d}.png")
                else:
                    image.save(target / f"{folder}_{n:05d}.jpg", quality=rng.randint(80, 95))
        for k in range(spec.corrupt.get(split, 0)):
            bad = root / split / folders[k % len(folders)] / f"broken_{k:03d}.jpg"
            bad.write_bytes(_corrupt_bytes(k, rng))
    return root


def make_opt_ml(
    base: Path, spec: SampleSpec | None = None, hyperparameters: Mapping[str, object] | None = None
) -> Path:
    """An /opt/ml tree as SageMaker lays it out for a training job on the sample dataset.

    Hyperparameter values are written as strings, the way SageMaker hands them over.
    """
    opt_ml = OptMl(base)
    make_dataset(opt_ml.data_dir, spec)
    write_training_config(opt_ml, DATA_CHANNELS, hyperparameters or {})
    return base


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to create (train/ valid/ test/ inside)")
    parser.add_argument("--classes", type=int, default=4, help="number of classes (2-16)")
    parser.add_argument("--train", type=int, default=16, help="training images per class")
    parser.add_argument("--valid", type=int, default=6, help="validation images per class")
    parser.add_argument("--test", type=int, default=6, help="test images per class")
    parser.add_argument("--min-side", type=int, default=64, help="smallest short side in pixels")
    parser.add_argument("--max-side", type=int, default=128, help="largest short side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument(
        "--opt-ml",
        action="store_true",
        help="write a whole /opt/ml training tree (data under input/data, config files) at root",
    )
    parser.add_argument(
        "--hp", action="append", default=[], metavar="KEY=VALUE", help="hyperparameter (--opt-ml)"
    )
    args = parser.parse_args()
    spec = SampleSpec(
        classes=args.classes,
        per_class={"train": args.train, "valid": args.valid, "test": args.test},
        min_side=args.min_side,
        max_side=args.max_side,
        seed=args.seed,
    )
    if args.opt_ml:
        hyperparameters = dict(item.split("=", 1) for item in args.hp)
        print(make_opt_ml(args.root, spec, hyperparameters))
    else:
        print(make_dataset(args.root, spec))


if __name__ == "__main__":
    _main()
