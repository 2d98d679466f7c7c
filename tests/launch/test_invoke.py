"""`launch invoke`: against the real `serve` process (--url) and against moto (--endpoint)."""

from __future__ import annotations

from pathlib import Path

from tests.launch.conftest import Launch, one_line_error
from tests.serving.conftest import Server, jpeg, photo


def test_url_prints_what_the_server_answered(launch: Launch, server: Server, dataset: Path) -> None:
    folder = dataset / "test" / "002.Afghan_hound"
    single = dataset / "test" / "001.Affenpinscher" / "001.Affenpinscher_00000.jpg"
    done = launch.ok("invoke", str(single), str(folder), "--url", server.url, "--top-k", "3")
    images = [single, *sorted(p for p in folder.iterdir() if p.suffix in (".jpg", ".png"))]
    blocks = done.stdout.split("\n" + str(dataset))  # one block per image, in order
    assert len(blocks) == len(images)
    for image, block in zip(images, blocks, strict=True):
        content_type = "image/png" if image.suffix == ".png" else "image/jpeg"
        answer = server.post(
            image.read_bytes(), content_type, X_Amzn_SageMaker_Custom_Attributes="top_k=3"
        ).json()
        assert str(image).endswith(block.splitlines()[0].split("  ")[0])
        assert f"(model {answer['model_version']})" in block
        rows = [line.split() for line in block.splitlines()[2:5]]
        assert len(rows) == 3 == len(answer["predictions"])
        for rank, (row, prediction) in enumerate(zip(rows, answer["predictions"], strict=True), 1):
            assert row[0] == str(rank)
            assert " ".join(row[1:-2]) == prediction["label"]
            assert row[-2] == str(prediction["index"])
            assert row[-1] == f"{prediction['probability']:.4f}"
        assert ("abstained, not sure" in block) == answer["abstained"]


def test_url_says_when_the_model_abstains(launch: Launch, server: Server, tmp_path: Path) -> None:
    # Noise, of none of the classes: a top probability below 1 (a sample image can be 1.0 in
    # float32, which min_confidence=1 does not refuse).
    image = tmp_path / "noise.jpg"
    image.write_bytes(jpeg(photo()))
    done = launch.ok(
        "invoke", str(image), "--url", server.url, "--custom-attributes", "min_confidence=1"
    )
    last = done.stdout.splitlines()[-1]
    assert last.startswith("  abstained, not sure it is any of these: top probability")
    assert last.endswith("is below min_confidence 1")


def test_url_reports_a_rejected_image_and_fails(
    launch: Launch, server: Server, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    done = launch("invoke", str(broken), "--url", server.url)
    assert done.returncode == 1
    assert f"{broken}: HTTP 400:" in done.stdout
    assert "1 of 1 images failed" in done.stdout


def test_moto_cannot_invoke_an_endpoint(launch: Launch, dataset: Path) -> None:
    image = next((dataset / "test").rglob("*.jpg"))
    done = launch("invoke", str(image), "--endpoint", "dog-classifier-endpoint")
    last = one_line_error(done)
    assert last.startswith("launch: moto cannot invoke endpoints")
    assert "use --url against a local container" in last


def test_no_images_is_one_line(launch: Launch, tmp_path: Path) -> None:
    done = launch("invoke", str(tmp_path), "--url", "http://127.0.0.1:9")
    assert one_line_error(done).startswith("launch: no images")
