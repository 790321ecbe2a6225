"""Every store container on every filesystem passes the same contract
(:class:`logitcache.testing.store_conformance.StoreConformance`).

A missing optional package skips only the classes that need it: zarr the Zarr classes; moto, s3fs
and boto3 the S3 classes.

S3: a real S3-compatible server (moto in server mode) started on 127.0.0.1 by the fixture below;
stores are written and read through s3fs exactly as on AWS.
"""

from __future__ import annotations

import uuid

import fsspec
import pytest

from logitcache.testing.store_conformance import StoreConformance, requires

needs_zarr = requires("zarr")
needs_s3 = requires("moto.server", "s3fs", "boto3")


class TestArrowLocal(StoreConformance):
    format = "arrow"


@needs_zarr
class TestZarrLocal(StoreConformance):
    format = "zarr"


class TestArrowLocalAns(StoreConformance):
    format = "arrow"
    entropy = "ans"


@needs_zarr
class TestZarrLocalAns(StoreConformance):
    format = "zarr"
    entropy = "ans"


@pytest.fixture(scope="session")
def s3_bucket():
    """A bucket on a local moto S3 server; fsspec's s3 defaults point at it for the session."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = dict(fsspec.config.conf.get("s3", {}))
    fsspec.config.conf["s3"] = {"endpoint_url": endpoint, "key": "testing", "secret": "testing",
                                "client_kwargs": {"region_name": "us-east-1"}}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                 region_name="us-east-1").create_bucket(Bucket="logitcache-test")
    yield "logitcache-test"
    fsspec.config.conf["s3"] = saved
    server.stop()


class S3Roots:
    max_examples = 5

    @pytest.fixture(autouse=True)
    def _bucket(self, s3_bucket):
        self.bucket = s3_bucket

    def make_root(self, tmp_path, name: str) -> str:
        return f"s3://{self.bucket}/{uuid.uuid4().hex}/{name}"


@needs_s3
class TestArrowS3(S3Roots, StoreConformance):
    format = "arrow"


@needs_s3
@needs_zarr
class TestZarrS3(S3Roots, StoreConformance):
    format = "zarr"


@needs_s3
class TestArrowS3Ans(S3Roots, StoreConformance):
    format = "arrow"
    entropy = "ans"
