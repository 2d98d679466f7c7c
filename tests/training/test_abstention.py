"""Calibrated probabilities and abstention, end to end: the real `train` on generated classes, the
artifact it writes, and the server's answers.

The data: the sample generator's 8-class family. Four classes are trained on; two others are the
"left-out class" (never seen by any job); the remaining two are the `unknown` channel of the second
job. `plain` trains without label smoothing for four epochs: a model that is right on most
validation images and over-confident, so that the temperature has something to correct.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from container.abstention import Outputs, Override, calibrated, confidence
from container.decoding import Preprocessing, decode, eval_crop
from container.images import to_uint8_hwc
from container.model import FEATURE_STATS_FILE, load_artifact
from container.sagemaker_env import UNKNOWN_CHANNEL
from container.sample_data import SampleSpec, make_dataset
from container.serving.predictor import Predictor
from container.training.calibration import auroc
from tests.conftest import FAST, Job, NewJob
from tests.serving.conftest import QUICK, App, in_process, serve_settings

TRUST = {
    **FAST,
    "epochs": 4,
    "batch_size": 16,
    "image_size": 64,
    "lr": 0.02,
    "warmup_epochs": 0.5,
    "label_smoothing": 0,
}
TRAINED, LEFT_OUT, UNKNOWN = (0, 1, 2, 3), (5, 6), (4, 7)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train/ valid/ test/ of the four trained classes, left_out/ and unknown/ beside them."""
    root = tmp_path_factory.mktemp("family")
    spec = SampleSpec(classes=8, per_class={"train": 20, "valid": 12, "test": 6}, corrupt={})
    data = make_dataset(root / "all", spec)
    for split in ("train", "valid", "test"):
        for index, folder in enumerate(sorted((data / split).iterdir())):
            place = (
                root / split
                if index in TRAINED
                else root / ("left_out" if index in LEFT_OUT else UNKNOWN_CHANNEL) / split
            )
            place.mkdir(parents=True, exist_ok=True)
            shutil.move(folder, place / folder.name)
    return root


def _trained(job: Job) -> Job:
    run = job.run()
    assert run.returncode == 0, run.stderr
    return job


@pytest.fixture(scope="module")
def plain(jobs: NewJob, family: Path) -> Job:
    return _trained(jobs("plain", TRUST, data=family))


@pytest.fixture(scope="module")
def with_unknown(jobs: NewJob, family: Path) -> Job:
    job = jobs(
        "with-unknown",
        {**TRUST, "train_unknown": True},
        channels=("train", "valid", "test", UNKNOWN_CHANNEL),
        data=family,
    )
    return _trained(job)


@pytest.fixture(scope="module")
def served(plain: Job) -> Iterator[App]:
    with in_process(serve_settings(plain.opt_ml, precision="fp32")) as app:
        app.wait_until(200)
        yield app


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _pixels(paths: list[Path], image_size: int) -> list[torch.Tensor]:
    prep = Preprocessing.for_image_size(image_size)
    return [to_uint8_hwc(eval_crop(decode(p, min_side=prep.resize_size), prep)) for p in paths]


def _negatives(size: int) -> list[torch.Tensor]:
    """Images of nothing: uniform noise and solid colours."""
    generator = torch.Generator().manual_seed(7)
    noise = [torch.randint(0, 256, (size, size, 3), generator=generator).byte() for _ in range(12)]
    colours = [
        torch.tensor(c, dtype=torch.uint8).expand(size, size, 3).contiguous()
        for c in ((255, 0, 0), (0, 0, 0), (255, 255, 255), (30, 200, 30), (0, 0, 255), (128,) * 3)
    ]
    return noise + colours


def _outputs(predictor: Predictor, pixels: list[torch.Tensor]) -> Outputs:
    each = predictor.predict_fp32(pixels)
    return Outputs(torch.cat([o.logits for o in each]), torch.cat([o.features for o in each]))


def test_the_temperature_is_fitted_on_valid_and_lowers_its_nll(plain: Job) -> None:
    report = plain.report("evaluation.json")
    calibration = report["calibration"]
    assert calibration["fitted"]
    valid = calibration["splits"]["valid"]
    assert valid["nll_after"] < valid["nll_before"]
    assert {"valid", "test"} == set(calibration["splits"])
    assert len(valid["reliability_after"]) == 15
    meta = plain.meta()
    assert meta["abstention"]["temperature"] == calibration["temperature"] != 1.0
    # One scalar divides the logits: every argmax, hence the accuracy, is what it was.
    artifact = load_artifact(plain.opt_ml.model_dir)
    predictor = Predictor(artifact, torch.device("cpu"), ["fp32"], optimize="eager")
    outputs = _outputs(predictor, _pixels(_images(plain.opt_ml.channel_dir("valid")), 64))
    assert torch.equal(
        calibrated(outputs.logits, calibration["temperature"]).argmax(dim=1),
        outputs.logits.argmax(dim=1),
    )
    html = (plain.opt_ml.output_data_dir / "evaluation.html").read_text()
    for heading in ("Findings", "Calibration", "Abstention", "Per class", "Most confused"):
        assert f"<h2>{heading}" in html, heading


def test_the_score_is_chosen_by_measurement_and_reported(plain: Job) -> None:
    abstention = plain.report("evaluation.json")["abstention"]
    comparison = abstention["comparison"]
    assert set(comparison) == {"probability", "margin", "energy", "mahalanobis", "combined"}
    best = max(comparison, key=lambda s: comparison[s]["auroc_synthetic"])
    assert abstention["score"] == best
    assert abstention["chosen_by"] == "auroc_synthetic"
    assert abstention["negatives"] == "synthetic"
    meta = plain.meta()["abstention"]
    assert (meta["score"], meta["threshold"]) == (abstention["score"], abstention["threshold"])
    assert (plain.opt_ml.model_dir / FEATURE_STATS_FILE).is_file()
    findings = plain.report("evaluation.json")["findings"]
    assert any("No `unknown` channel" in f["text"] for f in findings)


def test_a_left_out_class_and_negatives_abstain_far_more_than_trained_classes(
    plain: Job, family: Path
) -> None:
    artifact = load_artifact(plain.opt_ml.model_dir)
    policy = artifact.policy
    predictor = Predictor(artifact, torch.device("cpu"), ["fp32"], optimize="eager")
    held_out = _outputs(predictor, _pixels(_images(plain.opt_ml.channel_dir("test")), 64))
    strangers = _outputs(predictor, _pixels(_images(family / "left_out"), 64) + _negatives(64))
    detection = auroc(
        confidence(held_out, policy.score, policy), confidence(strangers, policy.score, policy)
    )
    assert detection is not None
    assert detection > 0.75

    def abstained(outputs: Outputs) -> float:
        rows = [
            Outputs(outputs.logits[i : i + 1], outputs.features[i : i + 1])
            for i in range(len(outputs.logits))
        ]
        return sum(predictor.answer(r, Override()).abstained for r in rows) / len(rows)

    assert abstained(strangers) >= abstained(held_out) + 0.25


def test_served_probabilities_are_the_calibrated_ones(served: App, plain: Job) -> None:
    artifact = load_artifact(plain.opt_ml.model_dir)
    temperature = artifact.policy.temperature
    predictor = Predictor(artifact, torch.device("cpu"), ["fp32"], optimize="eager")
    paths = [p for p in _images(plain.opt_ml.channel_dir("test")) if p.suffix == ".jpg"][:8]
    offline = _outputs(predictor, _pixels(paths, 64))
    expected = calibrated(offline.logits, temperature)
    for path, probabilities in zip(paths, expected, strict=True):
        response = served.post(
            path.read_bytes(), "image/jpeg", X_Amzn_SageMaker_Custom_Attributes="top_k=4"
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert isinstance(body["abstained"], bool)
        for row in body["predictions"]:
            assert row["probability"] == pytest.approx(float(probabilities[row["index"]]), abs=1e-4)


def test_min_confidence_and_abstain_off_change_the_answer(served: App, family: Path) -> None:
    stranger = next(p for p in _images(family / "left_out") if p.suffix == ".jpg")
    body = stranger.read_bytes()

    def ask(attributes: str) -> dict[str, object]:
        response = served.post(body, "image/jpeg", X_Amzn_SageMaker_Custom_Attributes=attributes)
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    strict = ask("min_confidence=1")
    assert strict["abstained"] is True
    assert "min_confidence 1" in str(strict["reason"])
    assert strict["predictions"]  # top-k still there: "not sure: maybe ..."
    lenient = ask("min_confidence=0.001")
    assert lenient["abstained"] is False
    assert "reason" not in lenient
    assert ask("abstain=off, min_confidence=1")["abstained"] is False
    for bad in ("min_confidence=2", "min_confidence=half", "abstain=maybe"):
        response = served.post(body, "image/jpeg", X_Amzn_SageMaker_Custom_Attributes=bad)
        assert response.status_code == 400
        assert bad.split("=")[0] in response.json()["message"]


def test_the_endpoint_settings_set_the_default(plain: Job, family: Path) -> None:
    stranger = next(p for p in _images(family / "left_out") if p.suffix == ".jpg")
    with in_process(serve_settings(plain.opt_ml, min_confidence=1.0, **QUICK)) as app:
        app.wait_until(200)
        answer = app.post(stranger.read_bytes()).json()
        assert answer["abstained"] is True
        assert "min_confidence" in answer["reason"]
        header = {"X_Amzn_SageMaker_Custom_Attributes": "min_confidence=0.001"}
        assert app.post(stranger.read_bytes(), "image/jpeg", **header).json()["abstained"] is False
    with in_process(
        serve_settings(plain.opt_ml, abstain=False, min_confidence=1.0, **QUICK)
    ) as app:
        app.wait_until(200)
        assert app.post(stranger.read_bytes()).json()["abstained"] is False


def test_an_unknown_channel_sets_the_threshold_and_trains_none_of_these(
    with_unknown: Job, plain: Job
) -> None:
    abstention = with_unknown.report("evaluation.json")["abstention"]
    assert abstention["negatives"] == "unknown channel"
    assert abstention["chosen_by"] == "auroc_unknown"
    assert abstention["unknown_output"] is True
    assert abstention["threshold"] != plain.report("evaluation.json")["abstention"]["threshold"]
    point = abstention["operating_point"]
    assert point["unknown_images"] == 26  # a third of the 2 x 38 unknown images is held out
    assert point["unknown_caught"] >= 0.75
    meta = with_unknown.meta()
    assert meta["abstention"]["unknown_output"] is True
    assert meta["num_classes"] == 4
    report = with_unknown.report("evaluation.json")
    assert report["data"][UNKNOWN_CHANNEL]["images"] == 26
    assert report["data"]["train"]["images"] == 80 + 50


def test_none_of_these_is_an_abstention_never_a_label(with_unknown: Job, family: Path) -> None:
    held_out = _images(family / UNKNOWN_CHANNEL)[::3]  # the third the job did not train on
    with in_process(serve_settings(with_unknown.opt_ml, precision="fp32")) as app:
        app.wait_until(200)
        answers = [
            app.post(p.read_bytes(), "image/png" if p.suffix == ".png" else "image/jpeg").json()
            for p in held_out
        ]
    labels = {row["label"] for a in answers for row in a["predictions"]}
    assert labels <= {"Affenpinscher", "Afghan hound", "Airedale terrier", "Akita"}
    none_of_these = [a for a in answers if a["abstained"] and "none of these" in a["reason"]]
    assert len(none_of_these) >= len(answers) // 2
