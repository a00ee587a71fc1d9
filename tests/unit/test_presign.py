"""Presigned GET URLs signed locally equal botocore's, byte for byte, for every endpoint shape and odd keys."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from core.presign import Presigner
from core.storage import s3_client

ENDPOINTS = ["http://127.0.0.1:8333", "https://s3.example.com", "http://localhost:80", "https://minio.internal:9000"]
KEYS = ["results/ten_1/job_2/0.png", "uploads/t/u p+l?#ä.png", "a~b/c*d", "ключ/图片.webp"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
@pytest.mark.parametrize("key", KEYS)
def test_the_url_equals_botocores(endpoint: str, key: str) -> None:
    client = s3_client(endpoint, region="eu-west-3", access_key_id="AKID/x+y", secret_access_key="s3cr3t/+=")
    signer = Presigner(endpoint, region="eu-west-3", access_key_id="AKID/x+y", secret_access_key="s3cr3t/+=",
                       bucket="zimage-results")  # fmt: skip
    theirs = client.generate_presigned_url("get_object", Params={"Bucket": "zimage-results", "Key": key}, ExpiresIn=900)
    signed_at = parse_qs(urlsplit(theirs).query)["X-Amz-Date"][0]
    now = datetime.strptime(signed_at, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    mine, expires = signer.url(key, 900, now=now)
    assert mine == theirs
    assert (expires - now).total_seconds() == 900


def test_a_non_http_endpoint_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        Presigner("s3://bucket", region="us-east-1", access_key_id="a", secret_access_key="b", bucket="x")
