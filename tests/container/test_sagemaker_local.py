"""SageMaker's own client drives the image: the Python SDK v2 in local mode (docker-compose).

These are the code paths SageMaker runs: the SDK writes the config files, mounts the channels,
runs `train`, tars /opt/ml/model, starts `serve` on host port 8080 for an endpoint and for a batch
transform (after reading GET /execution-parameters). Anything they trip over is an image bug.
"""

from __future__ import annotations

import gc
import json
import shutil
import socket
import tarfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest
from sagemaker.deserializers import JSONDeserializer
from sagemaker.estimator import Estimator
from sagemaker.local import LocalSession
from sagemaker.model import Model
from sagemaker.multidatamodel import MultiDataModel
from sagemaker.predictor import Predictor
from sagemaker.serializers import IdentitySerializer

from tests.conftest import FAST
from tests.container.conftest import containers_of, docker
from tests.serving.conftest import QUICK_ENV

ROLE = "arn:aws:iam::111111111111:role/SageMakerRole"


@contextmanager
def sdk_leaks_pipes() -> Iterator[None]:
    """Local mode drops docker-compose's Popen with its stdout pipe open (ResourceWarning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        yield
        gc.collect()


@contextmanager
def local_session(
    sdk_env: dict[str, str], root: Path, s3_endpoint_url: str | None = None
) -> Iterator[LocalSession]:
    """A local-mode session with telemetry off, fake credentials and its temp files in `root`;
    S3 is moto's when `s3_endpoint_url` names it."""
    with pytest.MonkeyPatch.context() as env:
        for name, value in sdk_env.items():
            env.setenv(name, value)
        boto = boto3.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
        )
        local = LocalSession(boto_session=boto, s3_endpoint_url=s3_endpoint_url)
        local.config = {"local": {"local_code": True, "container_root": str(root)}}
        yield local


@pytest.fixture(scope="module")
def session(
    tmp_path_factory: pytest.TempPathFactory, sagemaker_sdk_env: dict[str, str]
) -> Iterator[LocalSession]:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", 8080)) == 0:
            pytest.fail("host port 8080 is in use: local mode publishes endpoints there; free it")
    with local_session(sagemaker_sdk_env, tmp_path_factory.mktemp("sagemaker-local")) as local:
        yield local


@pytest.fixture(autouse=True)
def no_container_outlives_its_test(image: str) -> Iterator[None]:
    """Local mode leaves its containers behind: stopped ones, and after a failed deploy a running
    one that holds port 8080 (and keeps the SDK's docker-compose thread alive)."""
    yield
    left = containers_of(image)
    if left:
        docker("rm", "--force", *left)


@pytest.fixture(scope="module")
def model_data(
    image: str, session: LocalSession, dataset: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """Estimator(image_uri=...).fit(file:// channels) -> the model.tar.gz the SDK wrote."""
    output = tmp_path_factory.mktemp("estimator-output")
    estimator = Estimator(
        image_uri=image,
        role=ROLE,
        instance_count=1,
        instance_type="local",
        output_path=f"file://{output}",
        hyperparameters=FAST,
        sagemaker_session=session,
    )
    with sdk_leaks_pipes():
        estimator.fit(
            {split: f"file://{dataset / split}" for split in ("train", "valid", "test")},
            job_name="local-estimator-fit",
        )
    return Path(estimator.model_data.removeprefix("file://"))


def test_estimator_fit_trains_in_the_container(model_data: Path) -> None:
    with tarfile.open(model_data) as tar:
        names = set(tar.getnames())
    assert {"model.pt", "classes.json", "model_meta.json"} <= names


@pytest.fixture(scope="module")
def model(image: str, session: LocalSession, model_data: Path) -> Model:
    """The model of the fit, its server set through the model's environment to load the quick
    way (the SDK's paths are the subject; tests/container/test_image.py serves the defaults)."""
    return Model(
        image_uri=image,
        model_data=f"file://{model_data}",
        role=ROLE,
        sagemaker_session=session,
        name="local-dog-model",
        env=QUICK_ENV,
    )


def _jpeg_predictor(endpoint: str, session: LocalSession) -> Predictor:
    """The SDK's predictor of a local endpoint: JPEG bytes in, JSON out."""
    return Predictor(
        endpoint,
        sagemaker_session=session,
        serializer=IdentitySerializer("image/jpeg"),
        deserializer=JSONDeserializer(),
    )


def _test_jpegs(dataset: Path, count: int) -> list[Path]:
    return sorted((dataset / "test").rglob("*.jpg"))[:count]


def test_deploy_and_predict_jpeg_bytes(model: Model, session: LocalSession, dataset: Path) -> None:
    with sdk_leaks_pipes():
        # Local mode's create_endpoint returns once the container's /ping says 200 (it polls it
        # itself); wait=True would then sleep 30 s before its first DescribeEndpoint.
        model.deploy(
            initial_instance_count=1,
            instance_type="local",
            endpoint_name="local-dog",
            wait=False,
        )
    predictor = _jpeg_predictor("local-dog", session)
    try:
        classes = sorted(p.name for p in (dataset / "test").iterdir())
        for jpeg in _test_jpegs(dataset, 3):
            result = predictor.predict(jpeg.read_bytes())
            predictions = result["predictions"]
            assert len(predictions) == len(classes)
            assert sorted(p["index"] for p in predictions) == list(range(len(classes)))
            assert sum(p["probability"] for p in predictions) == pytest.approx(1.0, abs=1e-3)
        logs = docker("logs", containers_of(model.image_uri)[0], check=False)
        assert "batches of up to 1," in logs.stdout + logs.stderr  # the model's env reached it
    finally:
        with sdk_leaks_pipes():
            predictor.delete_endpoint(delete_endpoint_config=True)


def test_batch_transform_writes_one_out_per_jpeg(
    model: Model, dataset: Path, tmp_path: Path
) -> None:
    inputs = tmp_path / "in"  # flat: local mode lists a file:// folder without recursing
    inputs.mkdir()
    for jpeg in _test_jpegs(dataset, 5):
        shutil.copy(jpeg, inputs / jpeg.name)
    output = tmp_path / "out"
    transformer = model.transformer(
        instance_count=1,
        instance_type="local",
        output_path=f"file://{output}",
        accept="application/json",
    )
    with sdk_leaks_pipes():
        transformer.transform(
            f"file://{inputs}", content_type="image/jpeg", job_name="local-transform", logs=False
        )
        transformer.wait(logs=False)
    outs = sorted(p.name for p in output.iterdir())
    assert outs == sorted(f"{p.name}.out" for p in inputs.iterdir())
    for out in outs:
        top = json.loads((output / out).read_text())["predictions"][0]
        assert 0.0 <= top["probability"] <= 1.0


def test_a_multi_data_model_serves_each_target_model(
    image: str,
    sagemaker_sdk_env: dict[str, str],
    moto_server: str,
    model_data: Path,
    dataset: Path,
    tmp_path: Path,
) -> None:
    """`MultiDataModel` in local mode, its prefix in S3 (moto): local mode downloads the prefix,
    mounts it (its tarballs, and their files unpacked over each other) at /opt/ml/model, never
    calls /models, and sends each request to /invocations with the target model in the
    X-Amzn-SageMaker-Target-Model header; the server loads what that names on first use."""
    (tmp_path / "root").mkdir()
    with local_session(sagemaker_sdk_env, tmp_path / "root", moto_server) as session:
        s3 = session.boto_session.client("s3", endpoint_url=moto_server)
        s3.create_bucket(Bucket="multi-models")
        for name in ("dogs.tar.gz", "dogs-v2.tar.gz"):
            s3.upload_file(str(model_data), "multi-models", f"models/{name}")
        multi = MultiDataModel(
            name="local-multi-model",
            model_data_prefix="s3://multi-models/models/",
            image_uri=image,
            role=ROLE,
            env={"SAGEMAKER_MULTI_MODEL": "true", **QUICK_ENV},
            sagemaker_session=session,
        )
        with sdk_leaks_pipes():
            multi.deploy(
                initial_instance_count=1,
                instance_type="local",
                endpoint_name="local-multi",
                wait=False,
            )
        predictor = _jpeg_predictor("local-multi", session)
        classes = len(list((dataset / "test").iterdir()))
        jpeg = _test_jpegs(dataset, 1)[0].read_bytes()
        try:
            for target in ("dogs.tar.gz", "dogs-v2.tar.gz"):
                result = predictor.predict(jpeg, target_model=target)
                assert len(result["predictions"]) == classes
            logs = docker("logs", containers_of(image)[0], check=False)  # compose: a tty
            loaded = "Model 'dogs-v2.tar.gz' loaded from /opt/ml/model/dogs-v2.tar.gz"
            assert loaded in logs.stdout + logs.stderr
        finally:
            with sdk_leaks_pipes():
                predictor.delete_endpoint(delete_endpoint_config=True)
